"""The Qwen2.5 tokenizer, in process: chat rendering, exact token counts, and decoding safe to print in pieces."""
import functools
import os

# transformers announces at import that PyTorch is missing; we only need its tokenizers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import AutoTokenizer  # noqa: E402

from app.tokenizer.pieces import IM_END, IM_START, IncrementalDecoder, TokenBytes, vendor_prompt  # noqa: E402


class QwenTokenizer:
    """Loads a Qwen2.5 tokenizer folder (model repository's, or the one scripts/setup builds)."""

    def __init__(self, folder):
        self.folder = str(folder)
        self._tok = AutoTokenizer.from_pretrained(self.folder)
        self.eos_id = self._tok.convert_tokens_to_ids(IM_END)
        # Qwen2.5 has no BOS token; the runner's protocol spells "none" as -1.
        self.bos_id = -1
        added = {int(i): tok.content for i, tok in self._tok.added_tokens_decoder.items()}
        # The Rust tokenizer underneath, for id -> bytes without overhead (pieces.py; the same code the
        # tokenizer service's process uses).
        backend = self._tok.backend_tokenizer
        self.token_bytes = TokenBytes(backend.id_to_token, added, backend.get_vocab_size(with_added_tokens=True))

    def __len__(self):
        return self.token_bytes.size

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

    def ending_tokens(self, ending):
        """What a prompt's end adds to the sum of its turns (each turn ends with <|im_end|>\n): the assistant's
        next turn's header ("generate"), nothing ("none"), or minus the last turn's end ("continue")."""
        return self._ending_tokens[ending]

    @functools.cached_property
    def _ending_tokens(self):
        return {"generate": len(self.encode(IM_START + "assistant\n")), "none": 0,
                "continue": -len(self.encode(IM_END + "\n"))}

    def vendor_prompt_ids(self, line):
        """What the vendor's tokenizer script answers for one input line: the default template, one user turn."""
        return self.encode(vendor_prompt(line))

    # -- ids -> text ---------------------------------------------------------------------------
    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_strings(self, ids):
        """The tokens as the vocabulary spells them (byte-level BPE: "Ġhello" for " hello")."""
        return self._tok.convert_ids_to_tokens(list(ids))

    def valid_id(self, token_id):
        return self.token_bytes.valid_id(token_id)

    def incremental_decoder(self):
        return IncrementalDecoder(self.token_bytes)
