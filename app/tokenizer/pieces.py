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
    """The exact bytes a list of ids stands for (added tokens as their UTF-8 text), from a `tokenizers`
    Tokenizer. Cached: decoding is on every streamed chunk's path, and ids repeat a lot."""

    def __init__(self, backend, added):
        self._backend = backend
        self._added = dict(added)               # id -> text of the special and added tokens
        self._byte_of_char = byte_level_alphabet()
        self.size = backend.get_vocab_size(with_added_tokens=True)
        self._bytes_of_id = functools.lru_cache(maxsize=32768)(self._lookup)

    def __call__(self, ids):
        return b"".join(map(self._bytes_of_id, ids))

    def _lookup(self, token_id):
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._backend.id_to_token(token_id)
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
    """tokenizer.json through the `tokenizers` library only: the tokenizer service's process loads this."""

    def __init__(self, folder):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        self.backend = Tokenizer.from_file(str(path))
        added = {entry["id"]: entry["content"] for entry in json.loads(path.read_text())["added_tokens"]}
        self.token_bytes = TokenBytes(self.backend, added)
        self.eos_id = self.backend.token_to_id(IM_END)
        self.bos_id = -1  # Qwen2.5 has none; the runner's protocol spells "none" as -1

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def vendor_prompt_ids(self, line):
        return self.encode(vendor_prompt(line))

    def decode(self, ids):
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def valid_id(self, token_id):
        return self.token_bytes.valid_id(token_id)

    def incremental_decoder(self):
        return IncrementalDecoder(self.token_bytes)
