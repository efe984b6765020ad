"""The Qwen2.5 tokenizer, in process: chat rendering, exact token counts, and decoding safe to print in pieces."""
import codecs
import functools
import os

# transformers announces at import that PyTorch is missing; we only need its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class QwenTokenizer:
    """Loads a Qwen2.5 tokenizer folder (model repository's, or the one scripts/setup builds)."""

    def __init__(self, folder):
        self.folder = str(folder)
        self._tok = AutoTokenizer.from_pretrained(self.folder)
        self.eos_id = self._tok.convert_tokens_to_ids(IM_END)
        # Qwen2.5 has no BOS token; the runner's protocol spells "none" as -1.
        self.bos_id = -1
        # Byte-level BPE: every ordinary token stands for bytes spelled with printable stand-ins.
        self._byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = {int(i): tok.content for i, tok in self._tok.added_tokens_decoder.items()}
        self._backend = self._tok.backend_tokenizer  # the Rust tokenizer, for id -> token without overhead
        # Decoding is on every streamed chunk's path, and ids repeat a lot.
        self._bytes_of_id = functools.lru_cache(maxsize=32768)(self._lookup_bytes)
        self._vocab_size = len(self._tok)

    def __len__(self):
        return self._vocab_size

    @property
    def chat_template(self):
        return self._tok.chat_template

    # -- text -> ids ---------------------------------------------------------------------------
    def encode(self, text):
        """Ids of raw text; special-token markup in the text is read as the special tokens."""
        return self._tok.encode(text, add_special_tokens=False)

    def render_chat(self, messages, tools=None, add_generation_prompt=True):
        """The prompt text of a conversation, by the tokenizer's own chat template."""
        return self._tok.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages, tools=None, ending="generate"):
        """The prompt ids of a conversation. `ending`: "generate" opens the assistant's next turn (the usual
        prompt); "none" ends after the last message; "continue" leaves the final assistant message open, so
        that the model goes on with it (a prefill: no end-of-turn token, no new turn)."""
        text = self.render_chat(messages, tools, add_generation_prompt=ending == "generate")
        if ending == "continue":
            end = IM_END + "\n"
            if not messages or messages[-1].get("role") != "assistant" or not text.endswith(end):
                raise ValueError("to continue the final message, the conversation must end with an assistant "
                                 "message")
            text = text[:-len(end)]
        return self.encode(text)

    def vendor_prompt_ids(self, line):
        """What the vendor's tokenizer script answers for one input line: the default template, one user turn."""
        return self.chat_ids([{"role": "user", "content": line}])

    # -- ids -> text ---------------------------------------------------------------------------
    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_strings(self, ids):
        """The tokens as the vocabulary spells them (byte-level BPE: "Ġhello" for " hello")."""
        return self._tok.convert_ids_to_tokens(list(ids))

    def token_bytes(self, ids):
        """The exact bytes a list of ids stands for (added tokens as their UTF-8 text)."""
        return b"".join(map(self._bytes_of_id, ids))

    def _lookup_bytes(self, token_id):
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        return bytes(self._byte_of_char[c] for c in piece)

    def valid_id(self, token_id):
        return isinstance(token_id, int) and 0 <= token_id < self._vocab_size

    def incremental_decoder(self):
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns ids arriving a few at a time into text that is safe to print as it comes.

    A multi-byte character split between two pieces is held back until it is whole, so no piece
    ends in U+FFFD by accident; `finish()` releases whatever is left. The pieces concatenate to
    exactly `QwenTokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids = []

    def push(self, ids):
        self.ids.extend(ids)
        return self._utf8.decode(self._tokenizer.token_bytes(ids), final=False)

    def finish(self):
        return self._utf8.decode(b"", final=True)
