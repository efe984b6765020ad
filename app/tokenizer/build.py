"""Build the Qwen2.5 tokenizer folder from Qwen's BPE ranks, for machines without the model repository.

The model repository ships `qwen2.5_tokenizer/` (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt).
Where it is absent we rebuild the same folder from `qwen.tiktoken`, which the registry package dashscope 2.0.2
carries: the ranks, Qwen2's split pattern, NFC, byte-level BPE and the 22 Qwen2.5 added tokens reproduce the
official ids (the published vector in docs/PROTOCOL.md is checked before anything is written).

    python -m app.tokenizer.build OUT_DIR [--tiktoken FILE]

Nothing here is committed: the output is written at set-up time (scripts/setup).
"""
import argparse
import base64
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner

DASHSCOPE = "dashscope==2.0.2"
TIKTOKEN_IN_WHEEL = "dashscope/resources/qwen.tiktoken"
TEMPLATE_FILE = Path(__file__).with_name("qwen2.5_chat_template.jinja")

# Qwen2's pre-tokenizer split: like cl100k, but digits are split one by one.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_ADDED_ID = 151643
# Qwen2.5's added tokens in id order (151643...151664). The first 14 are special (skipped by
# skip_special_tokens); the tool-call and fill-in-the-middle markers are ordinary added tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
PLAIN_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

# docs/PROTOCOL.md: the default-template rendering of "hello world" and its official ids.
CHECK_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
)
CHECK_IDS = [
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
    10950, 17847, 13, 151645, 198, 151644, 872, 198, 14990, 1879, 151645, 198, 151644, 77091, 198,
]


def read_ranks(path):
    """Parse a .tiktoken file: one `base64(token bytes) rank` pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def find_tiktoken(workdir):
    """Return the path of qwen.tiktoken: from an installed dashscope, else from its wheel (no install)."""
    spec = importlib.util.find_spec("dashscope")
    if spec and spec.origin:
        installed = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
        if installed.is_file():
            return installed
    # Download the wheel only (no dependencies, nothing installed) and read the one file we need.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(workdir), DASHSCOPE],
        check=True,
    )
    wheel = next(Path(workdir).glob("dashscope-*.whl"))
    target = Path(workdir) / "qwen.tiktoken"
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(TIKTOKEN_IN_WHEEL))
    return target


def build_tokenizer(tiktoken_path):
    """Return a `tokenizers.Tokenizer` equivalent to Qwen2.5's tokenizer.json."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenRanksConverter(TikTokenConverter):
        # TikTokenConverter reads the ranks through the tiktoken package; the format is simple enough
        # to read directly, which keeps tiktoken out of the runtime requirements.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):
            return read_ranks(tiktoken_url)

    tok = QwenRanksConverter(vocab_file=str(tiktoken_path), pattern=SPLIT_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    if tok.get_vocab_size() != FIRST_ADDED_ID:
        raise SystemExit(f"unexpected BPE vocabulary size {tok.get_vocab_size()} (want {FIRST_ADDED_ID})")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PLAIN_ADDED_TOKENS])
    for offset, token in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS):
        if tok.token_to_id(token) != FIRST_ADDED_ID + offset:
            raise SystemExit(f"added token {token} did not land on id {FIRST_ADDED_ID + offset}")
    return tok


def tokenizer_config():
    added = {}
    for offset, token in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS):
        added[str(FIRST_ADDED_ID + offset)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": token in SPECIAL_TOKENS,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": TEMPLATE_FILE.read_text(encoding="utf-8"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build(out_dir, tiktoken_path=None):
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tiktoken_path or find_tiktoken(tmp))
    ids = tok.encode(CHECK_TEXT).ids
    if ids != CHECK_IDS:
        raise SystemExit(f"built tokenizer does not reproduce the official ids: {ids}")
    # Write into a sibling folder and rename, so an interrupted build never leaves a half folder behind.
    staging = out_dir.with_name(out_dir.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    tok.save(str(staging / "tokenizer.json"))
    tok.model.save(str(staging))  # vocab.json and merges.txt, as in the model repository
    (staging / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out_dir.exists():
        for child in out_dir.iterdir():
            child.unlink()
        out_dir.rmdir()
    os.replace(staging, out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--tiktoken", help="path of qwen.tiktoken (default: from dashscope 2.0.2)")
    args = parser.parse_args(argv)
    out = build(args.out_dir, args.tiktoken)
    print(f"tokenizer built in {out} (official ids reproduced)")


if __name__ == "__main__":
    main()
