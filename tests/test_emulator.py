"""The emulated runner against what the real main_axcl does (docs/PROTOCOL.md and the raw session fixture)."""
import functools
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect

from app.runner import protocol
from app.runner.driver import _child_setup
from helpers import EMULATOR, PROJECT_DIR, emulator_env, spawn_as_runner

FIXTURE = PROJECT_DIR / "tests" / "fixtures" / "main_axcl_session.log"  # raw bytes from real hardware
FIXTURE_SAMPLING = {  # the load config the fixture's session printed
    "enable_repetition_penalty": False, "enable_temperature": True, "enable_top_k_sampling": True,
    "enable_top_p_sampling": False, "penalty_window": 20, "repetition_penalty": 1.2, "temperature": 0.9,
    "top_k": 10, "top_p": 0.8,
}


def spawn(tokenizer, service, cwd, **settings):
    """The emulator under a pty, as the driver spawns it (no output translation, echo off, admitted)."""
    child = spawn_as_runner(service, lambda: pexpect.spawn(
        EMULATOR[0], EMULATOR[1:] + protocol.vendor_flags(str(cwd / "model"), service.url), cwd=str(cwd),
        env=emulator_env(tokenizer, **settings), echo=False, timeout=20,
        preexec_fn=functools.partial(_child_setup, os.getpid())))
    child.delaybeforesend = None
    return child


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
    flags = protocol.vendor_flags(str(tmp_path), service.url)
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
    flags = protocol.vendor_flags(str(tmp_path), service.url)
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
