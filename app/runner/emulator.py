"""An emulated main_axcl: the vendor runner's stdio and tokenizer calls, without the card.

    python -m app.runner.emulator <the vendor's flags>

It behaves like the vendor's own loop as docs/PROTOCOL.md describes it ("Seen in the vendor's own loop"): the
same flags (unknown ones rejected); the same bytes on stdout (banner, colours, progress bar, `>> `, the
`hit eos` notice); the same HTTP calls to the tokenizer service, as cpp-httplib makes them (a new connection
each, its headers, 1 s timeouts: `/bos_id` and `/eos_id` at start, `/encode` per input line, `/decode` every 3
ids and once more with all ids), with the same consequences (a call refused or answered later than 1 s: death
by SIGSEGV; a non-200 /decode: two [E] lines, 1 s, one retry, then ""); the same model files (the window from
the layer models' mask size, the embedding table opened read-write and mapped shared: emulated_model.py);
the same stop rules (eos, the window, SIGINT checked once per step after that step's id is sampled); `q` to
quit, and the spin on end of input (it sleeps between prompts rather than burning a core). SIGHUP is ignored,
as the trap in docs/PROTOCOL.md requires: only a signal that kills stops a runner whose parent is gone.

Its answer is deterministic and derived from the conversation it was given:
- it says it is the emulated runner and quotes the last user turn (for a prompt without chat markup, the
  prompt itself), so every client can tell its answer from another's;
- when that turn contains "count to N" (N up to 100000), it goes on with "1, 2, ..., N." (long answers for
  max_tokens and window tests);
- when the system turn offers tools and the last user turn says "call <name> [with <arguments>]" (or asks
  for "the weather in <place> [and <place>]" with a weather tool, or says "turn on|off X" with Home
  Assistant's intents; see `tool_reply`), it answers with <tool_call> blocks instead; when the last turn hands
  back tool results, it quotes them;
- when the last user turn says "answer with: TEXT", it answers TEXT exactly, whatever it is (structured
  output tests: JSON valid or not, wrapped in prose or fences, followed by more words);
- when the prompt ends inside an assistant message (a prefill to continue), it answers
  " (continued by the emulated runner)".

Environment (the driver sets these from the config's `runner.emulator` section):
  QWEN_EMULATOR_TOKEN_MS    milliseconds per step, prompt and output tokens alike (default 70, like the card)
  QWEN_EMULATOR_LOAD_MS     milliseconds per loading step, 31 steps (default 0; `slow_start` uses 300)
  QWEN_EMULATOR_FAULT       crash[:N] | hang[:N] | dead[:N] | slow_start | start_fail | no_permission
                            crash: after N output ids (default 4) print the dead-card text and exit 1
                            hang: after N output ids go silent, ignoring SIGINT, until killed
                            dead: print the dead-card text after N output ids, then hang
                            start_fail / no_permission: the [E] lines of a card that cannot be opened
  QWEN_EMULATOR_FAULT_FILE  a file whose content, when present and not empty, overrides QWEN_EMULATOR_FAULT;
                            read at start and at every prompt (tests use it as a card that dies and recovers)
  QWEN_EMULATOR_TOKENIZER   folder holding tokenizer.json (default: the model folder's, else instance/'s)
  QWEN_EMULATOR_TRACE       file to append "start|end <unix time>" lines to, one pair per generation, with a
                            "decode <seconds>" line per /decode round trip in between, or "decode-failed
                            <seconds>" before it dies of one (benchmarks read it)
"""
import functools
import json
import mmap
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from pathlib import Path

from app.paths import INSTANCE_DIR
from app.runner import emulated_model, protocol

BUILD_TIME = b"build time: Feb 13 2025 15:44:57\n"


class Stop(Exception):
    """End the process with this exit status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def out(data):
    """Write to stdout unbuffered, like the vendor's printf + fflush; a vanished terminal is not our problem."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(1, view)
        except InterruptedError:
            continue
        except OSError:
            return
        view = view[written:]


def runtime_log(level, where, message):
    """A line in the AXCL runtime's own format (the dead-card report uses it)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    return f"[{stamp}][{os.getpid()}][{level}]{where}: {message}\n".encode()


# -- command line --------------------------------------------------------------------------------------
def usage():
    lines = ["usage: main_axcl --prompt=string [options] ... ", "options:"]
    lines += [f"      --{name:<28} (string)" for name in protocol.FLAGS]
    lines.append("  -?, --help                          print this message")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    """`--name value` or `--name=value`, vendor flags only; --prompt is required."""
    opts = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-?", "--help"):
            sys.stderr.write(usage())
            raise Stop(0)
        if arg == "-p":
            arg = "--prompt"
        if not arg.startswith("--"):
            raise ValueError(f"unknown option: {arg}")
        name, eq, value = arg[2:].partition("=")
        if name not in protocol.FLAGS:
            raise ValueError(f"undefined option: --{name}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise ValueError(f"option needs value: --{name}")
            value = argv[i]
        opts[name] = value
        i += 1
    if "prompt" not in opts:
        raise ValueError("option needs value: --prompt")
    return opts


# -- the tokenizer service, as the runner's HTTP client ------------------------------------------------
class Unreachable(Exception):
    """A call that was refused, or not answered within the client's 1 s: the vendor's runner crashes."""


class BadAnswer(Exception):
    """A call answered with another status than 200, or with a body that is not the JSON expected."""


class TokenizerClient:
    """cpp-httplib 0.15.3 as the vendor's loop uses it (docs/PROTOCOL.md, "Seen in the vendor's own loop"): a new
    connection for every call, `Connection: close`, its headers in its order, compact JSON, and 1 s connect,
    write and read timeouts (the read timeout bounds each wait for data, not the whole call)."""

    TIMEOUT = 1.0
    USER_AGENT = "cpp-httplib/0.15.3"

    def __init__(self, base_url):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"tokenizer URL must be http://host:port, got {base_url!r}")
        self.host, self.port = parsed.hostname, parsed.port or 80

    def request_bytes(self, method, path, body=None):
        headers = [("Accept", "*/*"), ("Connection", "close")]
        payload = b""
        if body is not None:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers += [("Content-Length", str(len(payload))), ("Content-Type", "application/json")]
        headers += [("Host", f"{self.host}:{self.port}"), ("User-Agent", self.USER_AGENT)]
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        return head.encode("ascii") + payload

    def call(self, method, path, body=None):
        """The answer's JSON. Raises Unreachable (refused, or a wait longer than 1 s) or BadAnswer."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.TIMEOUT)
        except OSError as exc:
            raise Unreachable(str(exc)) from None
        with sock:
            try:
                sock.sendall(self.request_bytes(method, path, body))
                status, data = self._response(sock)
            except (OSError, ValueError) as exc:  # a timeout, a reset, a response that is not HTTP
                raise Unreachable(str(exc)) from None
        if status != 200:
            raise BadAnswer(f"status {status}")
        try:
            return json.loads(data)
        except ValueError:
            raise BadAnswer("unparsable JSON") from None

    @staticmethod
    def _response(sock):
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("closed before the answer's head")
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                       if line.lower().startswith(b"content-length:")), None)
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                if length is None:
                    break  # the body ends with the connection
                raise ValueError("closed before the answer's body")
            body += chunk
        return status, body[:length] if length is not None else body


def crash():
    """What the vendor's loop does when its tokenizer client fails outright: die by SIGSEGV."""
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)  # the signal is delivered at once; this is never reached


# -- the reply -----------------------------------------------------------------------------------------
TURN_RE = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>", re.S)
COUNT_RE = re.compile(r"count to (\d{1,6})", re.I)
VERBATIM_RE = re.compile(r"answer with: (.+)\Z", re.S)
OPEN_ASSISTANT_RE = re.compile(r"<\|im_start\|>assistant\n(?:(?!<\|im_end\|>).)+\Z", re.S)
CONTINUED = " (continued by the emulated runner)"
TOOLS_RE = re.compile(r"<tools>\n(.*?)\n</tools>", re.S)
CALL_RE = re.compile(r"\bcall `?([A-Za-z_][\w.-]*)`?(?: with (.+?))?(?=\s+and call\b|\s*$)", re.S)
WEATHER_RE = re.compile(r"weather in ([\w .'-]+?)(?:\s+and\s+(?:in\s+)?([\w .'-]+?))?\s*[?.!]*$", re.I)
RESULT_RE = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.S)
SWITCH_RE = re.compile(r"\bturn (on|off) (?:the )?([\w .'-]+?)\s*[?.!]*$", re.I)


def conversation(prompt_text):
    """(system turn, last user turn) of a rendered chat; a raw prompt is its own last user turn."""
    turns = TURN_RE.findall(prompt_text)
    if not turns:
        return "", prompt_text
    system = next((content for role, content in turns if role == "system"), "")
    users = [content for role, content in turns if role == "user"]
    return system, users[-1] if users else ""


def offered_tools(system):
    """Names of the tools the chat template listed in the system turn."""
    block = TOOLS_RE.search(system)
    names = []
    for line in block.group(1).splitlines() if block else []:
        try:
            tool = json.loads(line)
        except ValueError:
            continue
        spec = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            names.append(spec["name"])
    return names


def tool_reply(system, last_user):
    """<tool_call> blocks when tools are offered and the last user turn plainly asks for calls; else None.

    "call NAME" or "call NAME with ARGS" (ARGS copied as they are, so malformed JSON makes a malformed
    call), several joined by "and call"; or "the weather in X [and Y]" when a tool named get_weather or
    get_current_weather is offered: one call per place; or "turn on|off [the] X" when Home Assistant's
    HassTurnOn|HassTurnOff is offered: {"name": X}. NAME need not be an offered tool (a model can hallucinate
    one).
    """
    tools = offered_tools(system)
    if not tools:
        return None
    calls = [(name, args.strip() if args else "{}") for name, args in CALL_RE.findall(last_user)]
    weather = WEATHER_RE.search(last_user)
    weather_tool = next((t for t in ("get_weather", "get_current_weather") if t in tools), None)
    if not calls and weather and weather_tool:
        calls = [(weather_tool, json.dumps({"location": place.strip()})) for place in filter(None, weather.groups())]
    switch = SWITCH_RE.search(last_user)
    switch_tool = switch and {"on": "HassTurnOn", "off": "HassTurnOff"}[switch.group(1).lower()]
    if not calls and switch_tool in tools:  # Home Assistant's intents
        calls = [(switch_tool, json.dumps({"name": switch.group(2).strip()}))]
    if not calls:
        return None
    return "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>' for name, args in calls)


def reply_text(prompt_text):
    if OPEN_ASSISTANT_RE.search(prompt_text):  # the prompt ends inside an assistant message: a prefill
        return CONTINUED
    system, last_user = conversation(prompt_text)
    verbatim = VERBATIM_RE.search(last_user)
    if verbatim:  # "answer with: TEXT": TEXT exactly (JSON, valid or not, in prose or not)
        return verbatim.group(1)
    results = RESULT_RE.findall(last_user)
    if results:  # the last turn hands back tool results: answer from them
        return "Emulated runner: the tools answered " + "; ".join(f'"{r}"' for r in results) + "."
    tool_call = tool_reply(system, last_user)
    if tool_call is not None:
        return tool_call
    return plain_reply(last_user)


SAID = 'Emulated runner (no NPU card here). You said: "{}"'


def plain_reply(last_user):
    """The answer to a last user turn that asks for nothing in particular: what it said, then "1, 2, ..., N."
    when it asks to "count to N"."""
    text = SAID.format(last_user)
    count = COUNT_RE.search(last_user)
    if count:
        text += " " + ", ".join(str(i) for i in range(1, int(count.group(1)) + 1)) + "."
    return text


def load_tokenizer(opts):
    """tokenizers' Tokenizer for the emulator's own replies (the runner itself has none: it asks over HTTP)."""
    from tokenizers import Tokenizer

    folder = os.environ.get("QWEN_EMULATOR_TOKENIZER")
    candidates = [Path(folder)] if folder else []
    axmodel = opts.get("template_filename_axmodel", "")
    if axmodel:
        candidates.append(Path(axmodel).parent.parent / "qwen2.5_tokenizer")
    candidates.append(INSTANCE_DIR / "qwen2.5_tokenizer")
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(candidate / "tokenizer.json"))
    raise FileNotFoundError("no tokenizer.json in " + ", ".join(map(str, candidates)))


# -- faults --------------------------------------------------------------------------------------------
def current_fault():
    """(name, after) from the fault file if it says something, else from the environment."""
    spec = os.environ.get("QWEN_EMULATOR_FAULT", "")
    path = os.environ.get("QWEN_EMULATOR_FAULT_FILE")
    if path:
        try:
            spec = Path(path).read_text().strip() or spec
        except OSError:
            pass
    name, _, after = spec.strip().partition(":")
    return name, int(after) if after.isdigit() else 4


def dead_card_report():
    report = runtime_log("W", "[device manager][listen][292]", "device 1 is dead")
    report += runtime_log("C", "[device][print][18]", "allocated device memories: 3")
    for addr, size in ((0x162915000, 0x4A300), (0x162914000, 0xC00), (0x1627AD000, 0xC00)):
        report += runtime_log("C", "[device][print][20]", f"[{addr:#x}] : {size:#x} bytes")
    return report


def hang_forever():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(3600)


class ProgressBar:
    """The loading bar, byte for byte as the vendor's cqdm prints it (one line per step)."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        out(b"\x1b[1;30;33m")

    def step(self, name):
        self.done += 1
        i, total = self.done, self.total
        elapsed = time.monotonic() - self.started
        rate = i / max(elapsed, 0.002)
        blocks = min(i + 1, 32)
        spaces = 34 - blocks if i < total else 1
        line = (f"\n{i * 100 // total:3d}% | {'█' * blocks}{' ' * spaces}| {i:3d} / {total:3d} "
                f"[{elapsed:.2f}s<{elapsed / i * total:.2f}s, {rate:.2f} count/s] ")
        tail = "\x1b[1;30;32m" + name + ("\x1b[0m\x1b[1;30;33m" if i < total else "\n\x1b[0m")
        out((line + tail).encode())


# -- the runner ----------------------------------------------------------------------------------------
class Emulator:
    def __init__(self, opts):
        self.opts = opts
        self.token_s = float(os.environ.get("QWEN_EMULATOR_TOKEN_MS", "70")) / 1000.0
        self.trace = os.environ.get("QWEN_EMULATOR_TRACE")
        self.live_print = opts.get("live_print", "0") == "1"
        self.interrupted = False
        self.client = TokenizerClient(opts.get("filename_tokenizer_model", ""))
        self.tokenizer = None
        self.eos_id = protocol.EOS_ID
        self.window = protocol.MAX_TOKEN_LEN  # until the layer models say (their mask size - 1)
        self.embedding = None                 # the embedding table, mapped shared and read-write

    def on_sigint(self, signum, frame):
        self.interrupted = True

    def step(self):
        if self.token_s > 0:
            time.sleep(self.token_s)

    # start-up ---------------------------------------------------------------------------------------
    def init(self):
        out(BUILD_TIME)
        out(protocol.log_line("I", "Init", 111, "LLM init start"))
        fault, _ = current_fault()
        if fault in ("start_fail", "no_permission"):
            if fault == "start_fail":
                out(protocol.log_line("E", "axcl_init", 30, "Set AXCL device failed{0x80300186}"))
            else:
                out(runtime_log("E", "[device][open][113]", "request ports from device 1 fail, errno: 1 "
                                "Operation not permitted"))
            out(protocol.log_line("E", "Init", 117, "axcl init failed"))
            raise Stop(1)
        try:
            bos = self.client.call("GET", "/bos_id")["bos_id"]
            self.eos_id = self.client.call("GET", "/eos_id")["eos_id"]
        except Unreachable:
            crash()  # a tokenizer service that is down or late at start kills the vendor's loop too
        except (BadAnswer, KeyError, TypeError):
            out(protocol.log_line("E", "Init", 131, "tokenizer init failed"))
            raise Stop(1) from None
        out(f"bos_id: {bos}, eos_id: {self.eos_id}\n".encode())
        try:
            self.tokenizer = load_tokenizer(self.opts)
        except Exception as exc:  # OSError, or whatever tokenizers raises for a bad file
            out(protocol.log_line("E", "Init", 140, f"emulator: cannot load a tokenizer: {exc}"))
            raise Stop(1) from None
        default_load_ms = "300" if fault == "slow_start" else "0"
        load_s = float(os.environ.get("QWEN_EMULATOR_LOAD_MS", default_load_ms)) / 1000.0
        self.load_model(load_s)
        out(protocol.log_line("I", "Init", 226, f"max_token_len : {self.window}"))
        out(protocol.log_line("I", "Init", 231, f"kv_cache_size : 256, kv_cache_num: {self.window}"))
        self.load_config()
        out(protocol.log_line("I", "Init", 288, "LLM init ok"))
        out(protocol.READY_PROMPT[:-len(protocol.PROMPT)])

    def load_model(self, load_s):
        """Open the model's files as the vendor's loop does, each step reported on the 31-step loading bar."""
        layer_template = self.opts.get("template_filename_axmodel", "")
        steps = [("tokenizer init ok", None), ("embed_selector init ok", self.open_embedding)]
        steps += [(f"init {i} axmodel ok,remain_cmm(-1 MB)", functools.partial(self.open_layer, layer_template, i))
                  for i in range(int(self.opts.get("axmodel_num", protocol.LAYERS)))]
        steps.append(("init post axmodel ok", functools.partial(self.open_layer, self.opts.get(
            "filename_post_axmodel", ""), None)))
        bar = ProgressBar(len(steps))
        for i, (name, action) in enumerate(steps, start=1):
            if i > 1 and load_s > 0:
                time.sleep(load_s)
            if action is not None:
                action()
            bar.step(name)

    def open_embedding(self):
        """The embedding table is opened read-write and mapped shared: a read-only one crashes the runner."""
        path = self.opts.get("filename_tokens_embed", "")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            crash()
        try:
            self.embedding = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):  # an empty file cannot be mapped
            crash()
        finally:
            os.close(fd)

    def open_layer(self, template, index):
        path = template.replace("%d", str(index)) if index is not None else template
        try:
            mask = emulated_model.mask_size(path)
        except OSError:
            out(b"\n" + protocol.log_line("E", "Init", 194, f"init axmodel({path}) failed"))
            raise Stop(1) from None
        if index == 0:
            self.window = mask - 1  # the window is the layer models' mask size - 1

    def load_config(self):
        """post_config.json from the working directory: missing, a red and a yellow line and greedy decoding;
        malformed, the program aborts (as nlohmann::json's parse error does, uncaught)."""
        try:
            text = Path("post_config.json").read_text()
        except OSError:
            out(protocol.log_line("E", "load_config", 268, "open post_config.json failed"))
            out(protocol.log_line("W", "load_config", 273, "load post_config.json failed, use default config"))
            return
        try:
            config = json.loads(text)
        except ValueError:
            os.abort()
        dump = json.dumps(config, indent=4, sort_keys=True)
        out(protocol.log_line("I", "load_config", 282, f"load config: \n{dump}\n"))

    # one generation ---------------------------------------------------------------------------------
    def encode(self, line):
        """/encode as the vendor calls it: never retried. A failure leaves an empty id list that the loop then
        indexes (undefined behaviour): here, the crash it usually is."""
        try:
            ids = self.client.call("POST", "/encode", {"text": line})["token_ids"]
        except (Unreachable, BadAnswer, KeyError, TypeError):
            crash()
        if not isinstance(ids, list) or not ids:
            crash()
        return ids

    def decode(self, ids):
        """/decode as the vendor calls it. Refused or later than 1 s: the process dies (SIGSEGV). Another status
        or unparsable JSON: two [E] lines, 1 s, one retry (the same again on failure), then ""."""
        for attempt in (1, 2):
            sent = time.perf_counter()
            try:
                text = self.client.call("POST", "/decode", {"token_ids": ids})["text"]
            except Unreachable:
                self.record(f"decode-failed {time.perf_counter() - sent:.6f}")
                crash()
            except (BadAnswer, KeyError, TypeError) as exc:
                out(protocol.log_line("E", "Decode", 412, f"decode failed: {exc}"))
                out(protocol.log_line("E", "Decode", 413, "retry after 1s" if attempt == 1 else "give up"))
                time.sleep(1.0)
                continue
            self.record(f"decode {time.perf_counter() - sent:.6f}")
            return text if isinstance(text, str) else ""
        return ""

    def run(self, line):
        """One generation, step by step as the vendor's loop runs it: the prompt fed one id per step (the last
        prompt step samples the first output id), then one id per step; the stop flag checked once per step,
        after its id is sampled, so that the step a SIGINT interrupts still adds its id."""
        self.interrupted = False  # the vendor clears its stop flag at the start of every Run()
        prompt_ids = self.encode(line)
        self.record(f"start {time.time():.6f}")
        fault, fault_after = current_fault()
        started = time.monotonic()
        prompt_len = len(prompt_ids)
        budget = self.window + 1 - prompt_len  # output ids the window leaves room for
        outputs, pending = [], []
        for _ in range(min(prompt_len, self.window) - 1):  # steps that only feed the prompt
            if self.interrupted:
                break
            self.step()
        else:
            text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            reply = self.tokenizer.encode(reply_text(text), add_special_tokens=False).ids + [self.eos_id]
            for token in reply:
                if len(outputs) >= budget:
                    break  # the window is used up: pending ids are not printed
                self.step()  # feeds the last position and samples `token`
                if token == self.eos_id:
                    if pending and self.live_print:
                        out(self.decode(pending).encode())
                    break
                outputs.append(token)
                pending.append(token)
                if len(outputs) == fault_after and fault in ("crash", "hang", "dead"):
                    self.fault(fault)
                if len(pending) == protocol.CHUNK_IDS and self.live_print:
                    out(self.decode(pending).encode())
                    pending = []
                if self.interrupted:
                    break  # pending ids are not printed
        elapsed = max(time.monotonic() - started, 1e-6)
        out(protocol.end_notice((prompt_len + len(outputs)) / elapsed))
        final = self.decode(outputs)
        if not self.live_print:
            out(final.encode() + b"\n")
        self.record(f"end {time.time():.6f}")

    def record(self, line):
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(line + "\n")

    def fault(self, name):
        if name in ("crash", "dead"):
            out(dead_card_report())
        if name == "crash":
            raise Stop(1)
        hang_forever()

    # the loop ---------------------------------------------------------------------------------------
    def loop(self):
        prompt = self.opts.get("prompt", "")
        if prompt:
            self.run(prompt)
        if self.opts.get("continue", "0") != "1":
            raise Stop(0)
        stdin = sys.stdin.buffer
        while True:
            out(protocol.PROMPT)
            raw = stdin.readline()
            if not raw:
                # std::getline failing at end of input: the vendor loop prints ">> " forever. We sleep
                # between prompts instead of spinning a core, but hold on just as stubbornly.
                while True:
                    out(protocol.PROMPT)
                    time.sleep(0.5)
            line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace")
            if line == "q":
                raise Stop(0)
            if line == "":
                continue
            self.run(line)


def main(argv=None):
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n{usage()}")
        return 1
    except Stop as stop:
        return stop.status
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    emulator = Emulator(opts)
    signal.signal(signal.SIGINT, emulator.on_sigint)
    try:
        emulator.init()
        emulator.loop()
    except Stop as stop:
        return stop.status
    except ValueError as exc:
        out(protocol.log_line("E", "main", 1, str(exc)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
