"""main_axcl's stdio, as bytes: what the driver looks for and what the emulated runner prints.

Everything here is described in docs/PROTOCOL.md and seen in the raw session
tests/fixtures/main_axcl_session.log; tests/test_emulator.py holds the emulator's output against that fixture.
"""
import re

PROMPT = b">> "
MAX_TOKEN_LEN = 1024                   # the window (the layer models' mask size - 1): step i feeds position i
CHUNK_IDS = 3                          # ids the runner decodes and prints at a time
# The first text prints two steps after the last prompt token's: that step samples the first id, and the
# chunk prints once the next two are sampled.
STEPS_BEFORE_FIRST_TEXT = CHUNK_IDS - 1
LAYERS = 28
LOAD_STEPS = LAYERS + 3                # tokenizer, embed selector, 28 layers, post model
EOS_ID = 151645

# Vendor log lines: ESC[1;30;3Xm[L][<function right-aligned to 32>][<line to 4>]: message ESC[0m
LOG_COLOURS = {"E": b"31", "W": b"33", "I": b"32", "N": b"35"}


def log_line(level, function, line, message):
    """One vendor log line, e.g. log_line("I", "Init", 111, "LLM init start")."""
    head = f"[{level}][{function:>32}][{line:>4}]: {message}".encode("utf-8")
    return b"\x1b[1;30;" + LOG_COLOURS[level] + b"m" + head + b"\x1b[0m\n"


def end_notice(tokens_per_second):
    """What follows every generation, whatever ended it (eos, the window, SIGINT); the prompt comes after
    the runner's last /decode call."""
    return b"\n\n" + log_line("N", "Run", 610, f"hit eos,avg {tokens_per_second:.2f} token/s\n")


INIT_OK = b"LLM init ok"
READY_PROMPT = b'Type "q" to exit, Ctrl+c to stop current running\n' + PROMPT

# The end of a generation: "\n\n", the notice, "\n", the reset colour, "\n", then the prompt. Matched
# exactly, and only where the text the tokenizer service answered has all been seen (see driver.py).
END_RE = re.compile(
    rb"\n\n\x1b\[1;30;35m\[N\]\[ *Run\]\[ *\d+\]: hit eos,avg (?P<tps>[-+0-9.a-z]+) token/s\n\x1b\[0m\n>> ")
# Lines the runner prints on its own, in the two shapes it has: its logger's, and the AXCL runtime's.
VENDOR_LOG_RE = re.compile(rb"\x1b\[1;30;3\dm\[[EWINC]\]\[[^\]\n]*\]\[ *\d+\]: [^\n]*\n(?:\x1b\[0m)?")
RUNTIME_LOG_RE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\]\[\d+\]\[[A-Z]\][^\n]*\n")
DEAD_CARD_RE = re.compile(rb"device \d+ is dead")
ERROR_LINE_RE = re.compile(rb"\[E\]\[[^\]\n]*\]\[ *\d+\]: ([^\n\x1b]*)")
PROGRESS_RE = re.compile(rb"\|\s*(\d+) /\s*(\d+) \[")

# Flags of the vendor binary (docs/PROTOCOL.md, "Command line"). All take a value.
FLAGS = (
    "prompt", "template_filename_axmodel", "axmodel_num", "tokenizer_type", "filename_tokenizer_model",
    "bos", "eos", "filename_post_axmodel", "filename_tokens_embed", "tokens_embed_num", "tokens_embed_size",
    "use_mmap_load_embed", "dynamic_load_axmodel_layer", "live_print", "continue",
)
MODEL_SUBDIR = "qwen2.5-1.5b-gptq-int4-ax650"
LAYER_FILE = "qwen2_p128_l{}_together.axmodel"
POST_FILE = "qwen2_post.axmodel"
EMBED_FILE = "model.embed_tokens.weight.bfloat16.bin"  # opened read-write and mapped shared by the runner
TOKENS_EMBED_NUM, TOKENS_EMBED_SIZE = 151936, 1536
# The window the runner found in the layer models (their mask size - 1), in its banner.
WINDOW_RE = re.compile(rb"max_token_len : (\d+)")


def vendor_flags(model_dir, tokenizer_url):
    """The command-line flags the vendor's run script passes, with paths into `model_dir`."""
    sub = f"{model_dir}/{MODEL_SUBDIR}"
    return [
        "--prompt", "",
        "--template_filename_axmodel", f"{sub}/{LAYER_FILE.format('%d')}",
        "--axmodel_num", str(LAYERS),
        "--tokenizer_type", "2",
        "--filename_tokenizer_model", tokenizer_url,
        "--bos", "0", "--eos", "0",
        "--filename_post_axmodel", f"{sub}/{POST_FILE}",
        "--filename_tokens_embed", f"{sub}/{EMBED_FILE}",
        "--tokens_embed_num", str(TOKENS_EMBED_NUM), "--tokens_embed_size", str(TOKENS_EMBED_SIZE),
        "--use_mmap_load_embed", "1",
        "--dynamic_load_axmodel_layer", "0",
        "--live_print", "1",
        "--continue", "1",
    ]
