"""Token ids to text without transformers: the bytes each id stands for, text safe to print a few ids at a time,
and the vendor's one-turn prompt. What the tokenizer service's own process needs (it must start fast and stay
small: it loads only the `tokenizers` library and tokenizer.json), and what QwenTokenizer uses too, so that
there is one way to do each of these."""
import codecs
import functools
import json
from pathlib import Path

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def byte_level_alphabet():
    """Byte-level BPE's spelling of bytes (GPT-2's): printable bytes stand for themselves, the other 68 are
    shifted past 255 in order. Returns {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    shifted = 256
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(shifted)
            shifted += 1
    return {char: byte for byte, char in spelling.items()}


class TokenBytes:
    """The exact bytes a list of ids stands for (added tokens as their UTF-8 text). `token_of(id)` gives an
    ordinary token as the vocabulary spells it (None outside it); `added` maps the special and added tokens' ids
    to their text; `size` counts both. Cached: decoding is on every streamed chunk's path, and ids repeat a lot."""

    def __init__(self, token_of, added, size):
        self._token_of = token_of
        self._added = dict(added)
        self._byte_of_char = byte_level_alphabet()
        self.size = size
        self._bytes_of_id = functools.lru_cache(maxsize=32768)(self._lookup)

    def __call__(self, ids):
        return b"".join(map(self._bytes_of_id, ids))

    def _lookup(self, token_id):
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._token_of(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        return bytes(self._byte_of_char[c] for c in piece)

    def valid_id(self, token_id):
        return isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < self.size


class IncrementalDecoder:
    """Turns ids arriving a few at a time into text that is safe to print as it comes.

    A multi-byte character split between two pieces is held back until it is whole, so no piece ends in
    U+FFFD by accident; `finish()` releases whatever is left. The pieces concatenate to exactly the decoding
    of all the ids.
    """

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        return self._utf8.decode(self._token_bytes(ids), final=False)

    def finish(self):
        return self._utf8.decode(b"", final=True)


def vendor_prompt(line):
    """What the vendor's tokenizer script makes of one input line: the chat template with the default system
    prompt and the line as the one user turn (docs/PROTOCOL.md, "The tokenizer service it calls back")."""
    return (f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n{line}{IM_END}\n"
            f"{IM_START}assistant\n")


class Pieces:
    """The tokenizer folder as the tokenizer service's process needs it: ids to bytes from vocab.json and
    tokenizer_config.json's added tokens (a few MB, where the whole BPE model takes some 200 MB), and text to ids
    through the `tokenizers` library, loaded only when a line other than a registered handle is encoded (someone
    driving the runner by hand)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        vocab = json.loads((self.folder / "vocab.json").read_text(encoding="utf-8"))
        config = json.loads((self.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        added = {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()}
        spelled = [None] * (max(vocab.values()) + 1)
        for token, token_id in vocab.items():
            spelled[token_id] = token
        size = max(len(spelled), max(added, default=-1) + 1)
        self.token_bytes = TokenBytes(lambda i: spelled[i] if 0 <= i < len(spelled) else None, added, size)
        self.eos_id = next(i for i, text in added.items() if text == IM_END)
        self.bos_id = -1  # Qwen2.5 has none; the runner's protocol spells "none" as -1
        self._backend = None

    def load_encoder(self):
        """The BPE model for encode(), loaded at its first use (some 0.5 s and 200 MB) unless loaded here."""
        if self._backend is None:
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._backend

    def encode(self, text):
        return self.load_encoder().encode(text, add_special_tokens=False).ids

    def vendor_prompt_ids(self, line):
        return self.encode(vendor_prompt(line))

    def decode(self, ids):
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def valid_id(self, token_id):
        return self.token_bytes.valid_id(token_id)

    def incremental_decoder(self):
        return IncrementalDecoder(self.token_bytes)
