"""The in-process tokenizer: official ids, the chat template, exact counts, decoding safe to print in pieces."""
import json
import random
from pathlib import Path

import pytest
import tiktoken

from app.tokenizer import build
from app.tokenizer.pieces import byte_level_alphabet
from app.tokenizer.qwen import QwenTokenizer

HELLO = [{"role": "user", "content": "hello world"}]


def test_published_vector(tokenizer):
    assert tokenizer.chat_ids(HELLO) == build.CHECK_IDS
    assert tokenizer.encode(build.CHECK_TEXT) == build.CHECK_IDS
    assert tokenizer.vendor_prompt_ids("hello world") == build.CHECK_IDS


def test_folder_has_the_model_repository_layout(tokenizer):
    folder = Path(tokenizer.folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == build.TEMPLATE_FILE.read_text()
    assert config["eos_token"] == "<|im_end|>"
    assert tokenizer.eos_id == 151645 and tokenizer.bos_id == -1


def test_special_and_added_tokens(tokenizer):
    assert tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [151644, 151645, 151643]
    assert tokenizer.encode("<tool_call></tool_call>") == [151657, 151658]
    assert tokenizer.decode([151657, 151664]) == "<tool_call><|file_sep|>"
    assert len(tokenizer) == 151665


def test_chat_template_multi_turn_with_system_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse.\nVery terse."},
        {"role": "user", "content": "第一\n\nline two 🎉"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    assert tokenizer.render_chat(messages) == (
        "<|im_start|>system\nYou are terse.\nVery terse.<|im_end|>\n"
        "<|im_start|>user\n第一\n\nline two 🎉<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
        "<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n")
    # Without a system turn the template supplies Qwen's default one.
    assert tokenizer.render_chat(HELLO).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def reference_encoding(tokenizer):
    """tiktoken with Qwen's ranks and split pattern: the reference BPE the built tokenizer must match."""
    folder = Path(tokenizer.folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    byte_of = byte_level_alphabet()
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in vocab.items()}
    return tiktoken.Encoding("qwen-reference", pat_str=build.SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})


CORPUS = [
    "Hello, world! It's 2025-11-25 and the price is $1,234.56.",
    "    indented code:\n\tdef f(x):\n\t\treturn x**2  # comment\n\n\n",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장도 있습니다.",
    "Emoji: 🎉🎉 👨‍👩‍👧 🇫🇷 ❤️ and symbols ∑∫√ ≤≥",
    "Ünïcödé àccents, ß, Ω, Ж, ع, א",
    "mixed123numbers456and   spaces\r\nwindows line\rold mac",
    "'s 't 're 've 'm 'll 'd THEY'RE I'M",
    "URL https://example.com/a?b=c&d=e#f and e-mail a.b@c.de",
]


def test_matches_the_reference_bpe(tokenizer):
    reference = reference_encoding(tokenizer)
    rng = random.Random(7)
    texts = list(CORPUS)
    pieces = "".join(CORPUS)
    for _ in range(300):  # random slices recombine scripts, digits, spaces and punctuation
        a = rng.randrange(len(pieces))
        texts.append(pieces[a:a + rng.randrange(1, 60)])
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text), text


def test_incremental_decoding_joins_to_the_full_decode(tokenizer):
    rng = random.Random(3)
    for _ in range(500):
        ids = [rng.choice([rng.randrange(151665), rng.randrange(256), rng.randrange(100000, 151643)])
               for _ in range(rng.randrange(1, 15))]
        decoder = tokenizer.incremental_decoder()
        pieces, i = [], 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            pieces.append(decoder.push(ids[i:i + step]))
            i += step
        pieces.append(decoder.finish())
        assert "".join(pieces) == tokenizer.decode(ids)


def test_split_characters_are_held_back_not_replaced(tokenizer):
    text = "你好，世界 🎉🎉 emoji 👨‍👩‍👧 done"
    ids = tokenizer.encode(text)
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [decoder.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # The case is real: some 3-id chunk alone is not valid UTF-8.
    assert any("\ufffd" in tokenizer.decode(ids[i:i + 3]) for i in range(0, len(ids), 3))


def test_build_refuses_a_wrong_vocabulary(tmp_path):
    bogus = tmp_path / "bogus.tiktoken"
    bogus.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(SystemExit, match="vocabulary size"):
        build.build(tmp_path / "out", bogus)
    assert not (tmp_path / "out").exists()


def test_loads_a_model_repository_folder(tokenizer, tmp_path):
    # The same folder layout loads from anywhere (the model repository's qwen2.5_tokenizer/ is one).
    copy = tmp_path / "qwen2.5_tokenizer"
    copy.mkdir()
    for item in Path(tokenizer.folder).iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    assert QwenTokenizer(copy).chat_ids(HELLO) == build.CHECK_IDS
