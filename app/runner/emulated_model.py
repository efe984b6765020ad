"""A model folder for the emulated runner: the files main_axcl opens, in the places it opens them, with none
of the weights.

The vendor's runner reads its window from the layer models (the size of their `mask` input, minus 1) and opens
the embedding table read-write, mapped shared (docs/PROTOCOL.md, "Start-up"). The emulator does the same with
these files, so that a missing file, a read-only embedding table or another window behave as they would on
the card:
- each `qwen2_p128_l<i>_together.axmodel` and `qwen2_post.axmodel` is one line, `qwen-chat emulated axmodel
  mask=<n>` (the emulator reads the mask from layer 0; a real axmodel, read by the emulator, counts as 1025);
- `model.embed_tokens.weight.bfloat16.bin` has the real table's size (151936 x 1536 bfloat16: 467 MB) but is
  sparse: it takes no disk space until written, and nothing writes it.
"""
import os
import re
from pathlib import Path

from app.runner import protocol

HEADER = "qwen-chat emulated axmodel mask={mask}\n"
HEADER_RE = re.compile(rb"^qwen-chat emulated axmodel mask=(\d+)\n")
DEFAULT_MASK = protocol.MAX_TOKEN_LEN + 1
EMBED_BYTES = protocol.TOKENS_EMBED_NUM * protocol.TOKENS_EMBED_SIZE * 2  # bfloat16


def files(model_dir):
    """(layer files, post model, embedding table) where the vendor's flags point for `model_dir`."""
    sub = Path(model_dir) / protocol.MODEL_SUBDIR
    layers = [sub / protocol.LAYER_FILE.format(i) for i in range(protocol.LAYERS)]
    return layers, sub / protocol.POST_FILE, sub / protocol.EMBED_FILE


def present(model_dir):
    layers, post, embed = files(model_dir)
    return all(path.is_file() for path in [*layers, post, embed])


def write(model_dir, mask=DEFAULT_MASK):
    """Create (or complete) an emulated model folder; returns it."""
    layers, post, embed = files(model_dir)
    embed.parent.mkdir(parents=True, exist_ok=True)
    for path in [*layers, post]:
        if not path.is_file():
            path.write_text(HEADER.format(mask=mask))
    if not embed.is_file():
        with open(embed, "wb") as table:
            table.truncate(EMBED_BYTES)
    return Path(model_dir)


def mask_size(layer_file):
    """The mask size a layer file declares (an emulated one), DEFAULT_MASK for any other; OSError if unreadable."""
    with open(layer_file, "rb") as f:
        match = HEADER_RE.match(f.read(64))
    return int(match.group(1)) if match else DEFAULT_MASK


def writable(path):
    """Whether this process may open `path` read-write (what the runner does with the embedding table)."""
    return os.access(path, os.R_OK | os.W_OK)
