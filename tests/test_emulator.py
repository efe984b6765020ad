"""The emulated runner against what the real main_axcl does (docs/PROTOCOL.md and the raw session fixture)."""
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from app.runner import emulated_model, protocol
from app.runner.driver import child_setup, interrupt
from tests.helpers.fake_tokenizer import FakeTokenizerService
from tests.helpers import EMULATOR, PROJECT_DIR, emulator_command, emulator_env, spawn_as_runner

FIXTURE = PROJECT_DIR / "tests" / "fixtures" / "main_axcl_session.log"  # raw bytes from real hardware
FIXTURE_SAMPLING = {  # the load config the fixture's session printed
    "enable_repetition_penalty": False, "enable_temperature": True, "enable_top_k_sampling": True,
    "enable_top_p_sampling": False, "penalty_window": 20, "repetition_penalty": 1.2, "temperature": 0.9,
    "top_k": 10, "top_p": 0.8,
}


def spawn(tokenizer, service, cwd, **settings):
    """The emulator under a pty, as the driver spawns it (no output translation, echo off, admitted)."""
    child = spawn_as_runner(service, lambda: pexpect.spawn(
        *split(emulator_command(cwd / "model", service.url)), cwd=str(cwd),
        env=emulator_env(tokenizer, **settings), echo=False, timeout=20,
        preexec_fn=functools.partial(child_setup, os.getpid())))
    child.delaybeforesend = None
    return child


def split(command):
    return command[0], command[1:]


def normalise(data):
    """Blank out what legitimately varies: timings, rates, dates, pids, the answers' text."""
    data = re.sub(rb"\[[\d.]+s<[\d.]+s, [\d.]+ count/s\]", b"[T]", data)
    data = re.sub(rb"avg [\d.]+ token/s", b"avg R token/s", data)
    data = re.sub(rb"build time: [^\n]*", b"build time: B", data)
    # An answer is whatever lies between a prompt and the blank line before the notice.
    return re.sub(rb">> (?:(?!\n\n\x1b).)*?\n\n\x1b\[1;30;35m", b">> <ANSWER>\n\n\x1b[1;30;35m", data, flags=re.S)


def test_stdout_matches_the_real_session(tokenizer, service, tmp_path):
    """Banner, colours, progress bar, prompt and notice, byte for byte apart from timings and answers."""
    (tmp_path / "post_config.json").write_text(json.dumps(FIXTURE_SAMPLING))
    child = spawn(tokenizer, service, tmp_path)
    child.logfile_read = io.BytesIO()
    child.expect_exact(protocol.READY_PROMPT)
    for line in (b"2+2?", b"hello"):
        child.send(line + b"\n")
        child.expect_exact(b"token/s\n\x1b[0m\n>> ")
    ours = normalise(child.logfile_read.getvalue())
    child.send(b"q\n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0  # "q" ends the process cleanly

    real = normalise(FIXTURE.read_bytes())
    two_answers = [m.end() for m in re.finditer(rb"token/s\n\x1b\[0m\n>> ", real)][1]
    assert ours == real[:two_answers]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "app.runner.emulator", *args], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=30)


def test_unknown_flag_is_rejected_with_usage():
    done = run_cli("--prompt", "", "--bogus", "1")
    assert done.returncode != 0
    assert "--bogus" in done.stderr and "usage:" in done.stderr


def test_prompt_flag_is_required():
    done = run_cli("--live_print", "1")
    assert done.returncode != 0 and "--prompt" in done.stderr


def test_initial_prompt_without_continue_runs_once(tokenizer, service, tmp_path):
    flags = emulator_command(tmp_path / "model", service.url)[len(EMULATOR):]
    flags[flags.index("--prompt") + 1] = "say hi"
    flags[flags.index("--continue") + 1] = "0"
    proc = spawn_as_runner(service, lambda: subprocess.Popen(
        EMULATOR + flags, cwd=tmp_path, env=emulator_env(tokenizer), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b'You said: "say hi"' in stdout and b"hit eos" in stdout


def test_empty_line_prompts_again_and_sigint_at_the_prompt_is_harmless(tokenizer, service, tmp_path):
    child = spawn(tokenizer, service, tmp_path)
    child.expect_exact(protocol.READY_PROMPT)
    child.send(b"\n")
    child.expect_exact(protocol.PROMPT)
    child.sendintr()  # a stale interrupt must not cut the next answer short (Run() clears the flag)
    child.send(b"still answers\n")
    child.expect_exact(b'You said: "still answers"\n\n\x1b[1;30;35m')
    child.expect_exact(protocol.PROMPT)
    child.send(b"q\n")
    child.expect(pexpect.EOF)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def test_end_of_input_spins_without_burning_a_core(tokenizer, service, tmp_path):
    flags = emulator_command(tmp_path / "model", service.url)[len(EMULATOR):]
    proc = spawn_as_runner(service, lambda: subprocess.Popen(
        EMULATOR + flags, cwd=tmp_path, env=emulator_env(tokenizer), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL))
    try:
        ready = b""
        while not ready.endswith(protocol.READY_PROMPT):
            ready += proc.stdout.read(1)
        proc.stdin.close()  # the parent is gone: getline fails from now on
        before = cpu_seconds(proc.pid)
        started = time.monotonic()
        for _ in range(4):  # it keeps printing the prompt, like the vendor's loop...
            assert proc.stdout.read(len(protocol.PROMPT)) == protocol.PROMPT
        assert proc.poll() is None  # ...and never leaves on its own
        spent = cpu_seconds(proc.pid) - before
        assert spent < 0.25 * (time.monotonic() - started) + 0.05  # ...but sleeps between prompts
    finally:
        proc.kill()
        proc.wait()


def test_sighup_does_not_stop_it(tokenizer, service, tmp_path):
    # docs/PROTOCOL.md's trap: a runner whose terminal is gone holds on. Only a killing signal ends it.
    child = spawn(tokenizer, service, tmp_path)
    child.expect_exact(protocol.READY_PROMPT)
    child.kill(1)  # SIGHUP
    child.send(b"after hangup\n")
    child.expect_exact(b'You said: "after hangup"')
    child.terminate(force=True)


def test_start_failure_prints_error_lines_and_exits(tokenizer, service, tmp_path):
    child = spawn(tokenizer, service, tmp_path, fault="start_fail")
    child.expect(pexpect.EOF)
    assert b"[E]" in child.before and b"Set AXCL device failed" in child.before
    child.close()
    assert child.exitstatus == 1


def test_crash_prints_the_dead_card_report(tokenizer, service, tmp_path):
    child = spawn(tokenizer, service, tmp_path, fault="crash:2")
    child.expect_exact(protocol.READY_PROMPT)
    child.send(b"hello\n")
    child.expect(pexpect.EOF)
    assert protocol.DEAD_CARD_RE.search(child.before)
    assert protocol.RUNTIME_LOG_RE.search(child.before)


# -- the vendor loop's twin (docs/PROTOCOL.md, "Seen in the vendor's own loop") -------------------------------
@pytest.fixture
def fake_service(tokenizer):
    """make(**faults) -> a FakeTokenizerService (tests/helpers/fake_tokenizer.py), closed afterwards."""
    made = []

    def make(**faults):
        made.append(FakeTokenizerService(tokenizer.folder, **faults))
        return made[-1]
    yield make
    for fake in made:
        fake.close()


def spawn_on(tokenizer, url, cwd, model=None, **settings):
    """The emulator under a pty, calling the tokenizer service at `url` (no peer check there), on the model
    folder `model` as it is, else on an emulated one written in cwd/model."""
    command = EMULATOR + protocol.vendor_flags(str(model), url) if model else emulator_command(cwd / "model", url)
    child = pexpect.spawn(command[0], command[1:], cwd=str(cwd), env=emulator_env(tokenizer, **settings), echo=False,
                          timeout=20, preexec_fn=functools.partial(child_setup, os.getpid()))
    child.delaybeforesend = None
    return child


def finished(child):
    child.expect(pexpect.EOF, timeout=20)
    child.close()
    return child


def test_every_call_is_a_new_connection_with_cpp_httplibs_headers(tokenizer, fake_service, tmp_path):
    fake = fake_service()
    child = spawn_on(tokenizer, fake.url, tmp_path)
    child.expect_exact(protocol.READY_PROMPT)
    child.send(b"hello there\n")
    child.expect_exact(b"token/s\n\x1b[0m\n>> ")
    child.send(b"q\n")
    finished(child)
    host = fake.url[len("http://"):]
    calls = [(method, path) for method, path, _, _ in fake.requests]
    assert calls[:3] == [("GET", "/bos_id"), ("GET", "/eos_id"), ("POST", "/encode")]
    assert set(calls[3:]) == {("POST", "/decode")} and len(calls) > 5
    assert fake.connections == len(fake.requests)  # one connection per call, closed after it
    get_headers = ["Accept: */*", "Connection: close", f"Host: {host}", "User-Agent: cpp-httplib/0.15.3"]
    for method, _, headers, body in fake.requests:
        if method == "GET":
            assert headers == get_headers and body == b""
        else:
            assert headers == [*get_headers[:2], f"Content-Length: {len(body)}", "Content-Type: application/json",
                               *get_headers[2:]]
            assert body == json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False).encode()
    assert fake.requests[2][3] == b'{"text":"hello there"}'
    # Then one /decode per 3 ids, and a last one with every id.
    live, final = fake.decodes[:-1], fake.decodes[-1]
    assert all(len(ids) == 3 for ids in live[:-1]) and [i for ids in live for i in ids] == final


@pytest.mark.parametrize("fault", [{"decode_delay": {2: 1.3}}, {"refuse_after_decode": 1}],
                         ids=["answered-after-1.3-s", "refused"])
def test_a_decode_refused_or_later_than_a_second_kills_it_by_sigsegv(tokenizer, fake_service, tmp_path, fault):
    fake = fake_service(**fault)
    child = spawn_on(tokenizer, fake.url, tmp_path)
    child.expect_exact(protocol.READY_PROMPT)
    child.send(b"hello there\n")
    finished(child)
    assert child.signalstatus == signal.SIGSEGV
    assert b"hit eos" not in child.before  # it died in the middle of the generation


def test_a_tokenizer_service_that_is_down_at_start_kills_it_too(tokenizer, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = spawn_on(tokenizer, f"http://127.0.0.1:{port}", tmp_path)
    finished(child)
    assert child.signalstatus == signal.SIGSEGV and b"LLM init start" in child.before


@pytest.mark.parametrize("failing, lost", [({2: 500}, False), ({2: 500, 3: 503}, True)],
                         ids=["once", "twice"])
def test_a_non_200_decode_is_retried_once_a_second_later_then_printed_as_nothing(
        tokenizer, fake_service, tmp_path, failing, lost):
    fake = fake_service(decode_status=failing)
    child = spawn_on(tokenizer, fake.url, tmp_path)
    child.expect_exact(protocol.READY_PROMPT)
    started = time.monotonic()
    child.send(b"hello there\n")
    child.expect_exact(b"token/s\n\x1b[0m\n>> ")
    elapsed = time.monotonic() - started
    out = child.before
    child.send(b"q\n")
    finished(child)
    assert child.exitstatus == 0  # it lived on
    errors = re.findall(rb"\[E\]\[ *Decode\]\[ (41[23])\]", out)
    assert errors == [b"412", b"413"] * len(failing)
    assert elapsed >= len(failing) * 1.0  # a second's sleep after each failed try
    assert fake.decodes[1] == fake.decodes[2]  # the retry asks for the same ids
    chunk = tokenizer.decode(fake.decodes[1])
    text = tokenizer.decode(fake.decodes[-1])  # every id, in the last call
    printed = re.sub(rb"\x1b\[[0-9;]*m\[E\][^\n]*\n(\x1b\[0m)?", b"", out).split(b"\n\n")[0].decode()
    assert printed == (text.replace(chunk, "", 1) if lost else text)


def test_the_interrupted_step_still_adds_its_id(tokenizer, fake_service, tmp_path):
    fake = fake_service()
    child = spawn_on(tokenizer, fake.url, tmp_path, token_ms=300)
    child.expect_exact(protocol.READY_PROMPT)
    child.send(b"hello there\n")
    while len(fake.decodes) < 2:  # the second chunk of 3 is being printed...
        fake.decode_seen.wait(10)
        fake.decode_seen.clear()
    # ...once both chunks are on the terminal, the next step (300 ms) has begun
    child.expect_exact("".join(fake.pieces.decode(ids) for ids in fake.decodes[:2]).encode())
    interrupt(child)
    child.expect_exact(b"token/s\n\x1b[0m\n>> ")
    child.send(b"q\n")
    finished(child)
    live, final = fake.decodes[:-1], fake.decodes[-1]
    assert [i for ids in live for i in ids] == final[:6] and len(final) == 7  # 6 printed, and the 7th it sampled


def test_the_window_is_the_layer_models_mask_size_minus_one(tokenizer, fake_service, tmp_path):
    fake = fake_service()
    model = emulated_model.write(tmp_path / "model", mask=41)
    child = spawn_on(tokenizer, fake.url, tmp_path, model=model, token_ms=0)
    child.expect_exact(protocol.READY_PROMPT)
    assert b"max_token_len : 40" in child.before
    child.send(b"count to 100\n")  # the vendor prompt: 22 ids; the answer is far longer than the window
    child.expect_exact(b"token/s\n\x1b[0m\n>> ")
    child.send(b"q\n")
    finished(child)
    prompt = tokenizer.vendor_prompt_ids("count to 100")
    assert len(fake.decodes[-1]) == 41 - len(prompt)


def test_a_missing_layer_file_is_an_error_line_and_exit(tokenizer, fake_service, tmp_path):
    model = emulated_model.write(tmp_path / "model")
    emulated_model.files(model)[0][5].unlink()
    child = spawn_on(tokenizer, fake_service().url, tmp_path, model=model)
    finished(child)
    assert child.exitstatus == 1 and re.search(rb"\[E\].*init axmodel\(.*l5_together.axmodel\) failed", child.before)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a read-only mount needs root and unshare")
def test_a_read_only_embedding_table_crashes_it_at_start(tokenizer, fake_service, tmp_path):
    # The runner opens the table read-write and maps it shared (a root-owned folder, a read-only mount).
    model = emulated_model.write(tmp_path / "model")
    command = emulator_command(model, fake_service().url)
    read_only = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind "{model}" "{model}" && mount -o remount,bind,ro "{model}" && exec "$@"', "sh"]
    done = subprocess.run([*read_only, *command], cwd=tmp_path, env=emulator_env(tokenizer), capture_output=True,
                          timeout=60)
    assert done.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV), done
    assert b"tokenizer init ok" in done.stdout and b"embed_selector init ok" not in done.stdout


@pytest.mark.parametrize("config, outcome", [(None, "default"), ("{broken", "abort")])
def test_post_config_missing_or_broken(tokenizer, fake_service, tmp_path, config, outcome):
    if config is not None:
        (tmp_path / "post_config.json").write_text(config)
    child = spawn_on(tokenizer, fake_service().url, tmp_path)
    if outcome == "abort":
        finished(child)
        assert child.signalstatus == signal.SIGABRT
        return
    child.expect_exact(protocol.READY_PROMPT)
    assert re.search(rb"\[E\]\[ *load_config\].*\n.*\[W\]\[ *load_config\]", child.before)
    child.send(b"q\n")
    finished(child)
