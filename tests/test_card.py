"""The card's supervisor: one runner, first come first served, restarts, the lock, no orphans."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.runner.card import Card, CardOptions
from app.runner.jobs import Done, Text
from app.runner.errors import CardDead, CardUnavailable, RunnerError, RunnerStalled
from app.runner import card as card_module, emulated_model
from tests.helpers import PROJECT_DIR, alive, said, wait_for
from tests.helpers.jobs import result_of, spec_for
from tests.helpers.card_process import ask as tell, start_card_process

HOLD_CARD = Path(__file__).with_name("helpers") / "hold_card.py"


ask = spec_for


def test_first_come_first_served_each_with_its_own_answer(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 2})
    assert card.wait_ready(30) == "ready"
    jobs = [card.submit(ask(tokenizer, f"request {i}")) for i in range(6)]
    results = [None] * len(jobs)

    def consume(i):
        results[i] = result_of(jobs[i], timeout=60)

    threads = [threading.Thread(target=consume, args=(i,)) for i in reversed(range(len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.text for r in results] == [said(f"request {i}") for i in range(len(jobs))]
    starts = [job.started_at for job in jobs]
    assert starts == sorted(starts)  # served in arrival order, whatever order the readers came in


def test_streamed_events(make_card, tokenizer):
    card = make_card()
    job = card.submit(ask(tokenizer, "stream me"))
    texts = []
    while True:
        event = job.next_event(timeout=30)
        if isinstance(event, Done):
            break
        if isinstance(event, Text):
            texts.append(event.text)
    assert "".join(texts) == event.result.text == said("stream me")


def test_a_cancelled_waiter_is_skipped(make_card, tokenizer):
    card = make_card(emulator={"token_ms": 5})
    first = card.submit(ask(tokenizer, "count to 200"))
    skipped = card.submit(ask(tokenizer, "never served"))
    skipped.cancel()
    last = card.submit(ask(tokenizer, "served"))
    assert result_of(last, timeout=60).text == said("served")
    assert result_of(first, timeout=5).finish_reason == "stop"
    assert skipped.started_at is None


@pytest.mark.parametrize("fault, error, runs", [("crash:4", CardDead, 1), ("hang:4", RunnerStalled, 2)])
def test_failure_mid_reply_then_the_next_request_works(make_card, tokenizer, tmp_path, fault, error, runs):
    fault_file = tmp_path / "fault"
    fault_file.write_text(fault)
    card = make_card(emulator={"fault_file": str(fault_file)}, stall_timeout=0.5)
    with pytest.raises(error):
        result_of(card.submit(ask(tokenizer, "hello")), timeout=30)
    fault_file.write_text("")  # the card works again
    if card.state == "unavailable":  # a dead card is reported unavailable until it starts again
        wait_for(lambda: card.state == "ready", what="the card to come back")
    assert result_of(card.submit(ask(tokenizer, "again")), timeout=30).text == said("again")
    # A hung runner's job runs again once on a new runner (and hangs again: the fault stays); a dead card's
    # does not (the card is unavailable).
    assert (card.restarts, card.retries) == (runs, runs - 1)


def test_runner_exit_while_idle_is_noticed_and_repaired(make_card, tokenizer):
    card = make_card()
    assert card.wait_ready(30) == "ready"
    first_pid = card.runner.pid
    os.kill(first_pid, signal.SIGKILL)
    wait_for(lambda: card.runner is not None and card.runner.pid != first_pid and card.state == "ready",
             what="a new runner")
    assert result_of(card.submit(ask(tokenizer, "fresh")), timeout=30).text == said("fresh")


def test_start_failure_makes_the_card_unavailable_until_it_recovers(make_card, tokenizer, tmp_path):
    fault_file = tmp_path / "fault"
    fault_file.write_text("start_fail")
    card = make_card(emulator={"fault_file": str(fault_file)}, backoff_initial=0.2, backoff_max=0.4)
    assert card.wait_ready(30) == "unavailable"
    assert card.npu == "unavailable" and "Set AXCL device failed" in card.reason
    started = time.monotonic()
    with pytest.raises(CardUnavailable, match="Set AXCL device failed"):
        card.submit(ask(tokenizer, "hello"))
    assert time.monotonic() - started < 0.1  # fast, not queued
    fault_file.write_text("")
    wait_for(lambda: card.state == "ready", what="recovery")
    assert card.npu == "emulated"
    assert result_of(card.submit(ask(tokenizer, "back")), timeout=30).text == said("back")


def test_backoff_grows_and_is_capped(tokenizer, tmp_path):
    # The restart policy, driven directly on a card that is not started: the delays double up to the cap,
    # and three failures in a row make the card unavailable (503 at once instead of queueing).
    card = Card(tokenizer, CardOptions(model_dir=tmp_path, binary="emulator", workdir=tmp_path / "w",
                                       lock_path=tmp_path / "lock", backoff_initial=0.1, backoff_max=0.4))
    delays, states = [], []
    for _ in range(5):
        before = time.monotonic()
        card._failed(RunnerError("it broke"), unavailable=False)
        delays.append(round(card.retry_at - before, 2))
        states.append(card.state)
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert states == ["loading", "loading", "unavailable", "unavailable", "unavailable"]
    assert card._retry_after() == 1  # whole seconds for Retry-After, never 0


def test_missing_binary_is_one_clear_message(tokenizer, tmp_path):
    card = Card(tokenizer, CardOptions(model_dir=tmp_path, binary="/nonexistent/main_axcl", workdir=tmp_path / "w",
                                       lock_path=tmp_path / "lock", backoff_initial=30)).start()
    try:
        assert card.wait_ready(10) == "unavailable"
        assert "cannot start the runner /nonexistent/main_axcl" in card.reason
    finally:
        card.stop()


def test_incomplete_model_folder_is_one_clear_message(tokenizer, tmp_path):
    fake = tmp_path / "main_axcl"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    card = Card(tokenizer, CardOptions(model_dir=tmp_path / "model", binary=str(fake), workdir=tmp_path / "w",
                                       lock_path=tmp_path / "lock", backoff_initial=30)).start()
    try:
        assert card.wait_ready(10) == "unavailable"
        assert "model folder" in card.reason and "is incomplete" in card.reason
    finally:
        card.stop()


def start_holder(lock_path, workdir):
    proc = subprocess.Popen([sys.executable, str(HOLD_CARD), str(lock_path), str(workdir)], cwd=PROJECT_DIR,
                            stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


def test_a_second_process_on_the_same_card_is_refused(make_card, tmp_path):
    lock = tmp_path / "card.lock"
    card = make_card(lock_path=lock)
    assert card.wait_ready(30) == "ready"
    proc, state = start_holder(lock, tmp_path / "second")
    try:
        assert state["state"] == "unavailable" and state["runner_pid"] is None
        assert f"another process (pid {os.getpid()}) is driving the card" in state["reason"]
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_of_the_parent_leaves_no_runner(tmp_path):
    proc, state = start_holder(tmp_path / "card.lock", tmp_path / "w")
    runner_pid = state["runner_pid"]
    assert state["state"] == "ready" and alive(runner_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not alive(runner_pid), timeout=10, what="the orphaned runner to die")


def test_a_runner_folder_that_cannot_be_made_is_a_clear_start_error_and_the_card_recovers(make_card, tokenizer,
                                                                                          tmp_path):
    # The runner's working directory cannot be written (a file is in the way): starting fails with an
    # OSError. The card says so and keeps trying; it must not die and leave requests waiting forever.
    card = make_card()
    assert card.wait_ready(30) == "ready"
    blocker = tmp_path / "runner"
    card.runner.child.kill(9)
    wait_for(lambda: card.runner is None or not card.runner.child.isalive(), what="the runner to die")
    shutil.rmtree(blocker)
    blocker.write_text("not a directory")
    wait_for(lambda: card.failures >= 2, what="failed restarts")
    assert card._thread.is_alive() and card.reason.startswith("cannot prepare the runner's files: File exists")
    blocker.unlink()
    wait_for(lambda: card.state == "ready", what="recovery")
    assert result_of(card.submit(ask(tokenizer, "alive")), timeout=30).text == said("alive")


def test_a_bug_of_ours_at_start_does_not_end_the_card_thread(make_card, tokenizer, monkeypatch):
    card = make_card()
    assert card.wait_ready(30) == "ready"
    broken = {"yes": True}
    real = card_module.prepare_workdir

    def prepare_workdir(*args):
        if broken["yes"]:
            raise KeyError("a bug")
        return real(*args)

    monkeypatch.setattr(card_module, "prepare_workdir", prepare_workdir)
    card.runner.child.kill(9)
    wait_for(lambda: card.failures >= 2, what="failed restarts")
    assert card._thread.is_alive() and card.reason == "internal error (KeyError)"
    broken["yes"] = False
    wait_for(lambda: card.state == "ready", what="recovery")
    assert result_of(card.submit(ask(tokenizer, "alive")), timeout=30).text == said("alive")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a read-only mount needs root and unshare")
def test_a_read_only_model_folder_is_a_clear_start_error_not_a_crash_loop(tmp_path):
    # main_axcl opens the embedding table read-write and crashes at start on a read-only one
    # (docs/PROTOCOL.md): the Card says why, and how to fix it, instead of starting it.
    model = emulated_model.write(tmp_path / "model")
    read_only = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind "{model}" "{model}" && mount -o remount,bind,ro "{model}" && exec "$@"', "sh"]
    card, started = start_card_process(tmp_path, wrap=read_only)
    try:
        assert started["state"] == "unavailable" and started["runner_pid"] is None, started
        assert "model.embed_tokens.weight.bfloat16.bin is not writable" in started["reason"]
        assert "chown -R" in started["reason"] and "ReadWritePaths" in started["reason"]
        assert tell(card, failures=2)["failures"] >= 2  # it keeps saying so (with backoff), never spawning a runner
    finally:
        card.stdin.close()
        log = card.stderr.read()
        card.wait(60)
    assert "starting the runner" not in log and "SIGSEGV" not in log
