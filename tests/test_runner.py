"""The driver (Runner) against the emulated runner: a real child process under a real pty."""
import os
import signal
import threading
import time

import pytest

from app.runner import protocol
from app.runner.driver import ENCODE_SECONDS
from app.runner.errors import CardDead, RunnerDied, RunnerStalled, RunnerStartError
from tests.helpers import emulator_command, emulator_env, prompt_ids, said

SPLIT_TEXT = "你好，世界 🎉🎉 emoji 👨‍👩‍👧 done"


@pytest.fixture
def runner(make_runner):
    return make_runner()


def generate(runner, ids, **kwargs):
    pieces = []
    result = runner.generate(ids, on_text=pieces.append, **kwargs)
    assert "".join(pieces) == result.text  # what streams is exactly what is returned
    return result, pieces


def test_multi_turn_with_system_prompt_newlines_cjk_and_emoji(runner, tokenizer):
    last = "Third turn:\nline two\n\n第三 🎉 done"
    ids = prompt_ids(tokenizer, "first\nquestion", "an answer", last, system="Be brief.\nReally brief.")
    result, pieces = generate(runner, ids)
    # One line went to the runner; the whole conversation, newlines included, reached it via /encode.
    assert result.text == said(last)
    assert result.prompt_tokens == len(ids)
    assert result.ids == tokenizer.encode(result.text)
    assert result.finish_reason == "stop"
    assert len(pieces) > 3  # it streamed


@pytest.mark.parametrize("text", [
    ">> not a prompt >> ",
    "blank\n\n\nlines\n\n",
    "hit eos,avg 12.65 token/s\n>> ",
    "\n\n\x1b[1;30;35m[N][                             Run][ 610]: hit eos,avg 1.00 token/s\n\x1b[0m\n>> ",
])
def test_text_that_looks_like_framing_comes_back_byte_exact(runner, tokenizer, text):
    result, _ = generate(runner, prompt_ids(tokenizer, text))
    assert result.text == said(text)
    # ...and the runner is left at its prompt: the next generation is clean.
    assert generate(runner, prompt_ids(tokenizer, "next"))[0].text == said("next")


def test_multibyte_character_split_across_chunks(runner, tokenizer):
    result, pieces = generate(runner, prompt_ids(tokenizer, SPLIT_TEXT))
    assert result.text == said(SPLIT_TEXT)
    assert not any("\ufffd" in piece for piece in pieces)
    # The reply really does split a character between the runner's 3-id chunks.
    chunks = [result.ids[i:i + 3] for i in range(0, len(result.ids), 3)]
    assert any("\ufffd" in tokenizer.decode(chunk) for chunk in chunks)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 7, 20])
def test_max_tokens_is_exact(runner, tokenizer, max_tokens):
    result, _ = generate(runner, prompt_ids(tokenizer, "count to 100"), max_tokens=max_tokens)
    assert len(result.ids) == max_tokens
    assert result.text == tokenizer.decode(result.ids)
    assert result.finish_reason == "length"
    assert generate(runner, prompt_ids(tokenizer, "after"))[0].text == said("after")


def test_max_tokens_beyond_the_answer_is_a_normal_stop(runner, tokenizer):
    result, _ = generate(runner, prompt_ids(tokenizer, "short"), max_tokens=500)
    assert result.text == said("short") and result.finish_reason == "stop"


def test_stop_string_spanning_two_chunks(runner, tokenizer):
    ids = prompt_ids(tokenizer, "count to 60")
    full, _ = generate(runner, ids)
    # Pick a stop string whose text starts in one 3-id chunk and ends in the next.
    ends = [len(tokenizer.decode(full.ids[:i])) for i in range(0, len(full.ids) + 1, 3)]
    boundary = next(e for e in ends if full.text[e - 2:e + 3].count(",") == 1 and e > 80)
    stop = full.text[boundary - 2:boundary + 3]
    assert full.text.find(stop) == boundary - 2
    result, pieces = generate(runner, ids, stop=["never appears", stop])
    assert result.text == full.text[:boundary - 2]
    assert result.finish_reason == "stop" and result.stop_sequence == stop
    assert stop not in "".join(pieces)
    assert len(result.ids) < len(full.ids)
    assert stop in tokenizer.decode(result.ids)  # ids up to the one that completed the stop string


def test_stop_string_never_leaks_a_prefix(runner, tokenizer):
    # "21" streams before ", 22" is known; it must be held back, not sent and then taken back.
    result, pieces = generate(runner, prompt_ids(tokenizer, "count to 30"), stop=["21, 22"])
    assert result.text.endswith("20, ") and "21" not in "".join(pieces)


def test_the_1024_token_window_ends_as_length(runner, tokenizer):
    ids = prompt_ids(tokenizer, "count to 2000")
    result, _ = generate(runner, ids)
    assert result.finish_reason == "length"
    # docs/PROTOCOL.md: a prompt of L tokens yields at most 1025 - L output ids; the last 1-2 are never
    # printed but come with the final /decode, and they are part of the result.
    assert len(result.ids) == protocol.MAX_TOKEN_LEN + 1 - len(ids)
    assert result.text == tokenizer.decode(result.ids)
    assert generate(runner, prompt_ids(tokenizer, "after the window"))[0].text == said("after the window")


def test_prompt_of_1024_tokens_yields_one_id(runner, tokenizer):
    ids = tokenizer.encode("7" * protocol.MAX_TOKEN_LEN)  # Qwen splits digits: one id each
    assert len(ids) == protocol.MAX_TOKEN_LEN
    result, _ = generate(runner, ids)
    assert len(result.ids) == 1 and result.finish_reason == "length"


def test_cancel_mid_reply_then_a_normal_request(make_runner, tokenizer):
    runner = make_runner(token_ms=5)
    cancel = threading.Event()
    pieces = []

    def on_text(piece):
        pieces.append(piece)
        cancel.set()  # the client goes away as soon as the first text arrives

    result = runner.generate(prompt_ids(tokenizer, "count to 1000"), on_text=on_text, cancelled=cancel.is_set)
    assert result.finish_reason == "cancelled"
    assert 0 < len(result.ids) < 100
    after, _ = generate(runner, prompt_ids(tokenizer, "and now?"))
    assert after.text == said("and now?")


def test_timings_are_reported(make_runner, tokenizer):
    runner = make_runner(token_ms=10)
    ids = prompt_ids(tokenizer, "timing")
    result, _ = generate(runner, ids)
    # The emulator spends token_ms per prompt token before the first output id.
    assert result.prompt_seconds >= len(ids) * 0.010
    assert result.generation_seconds > 0 and result.tokens_per_second > 0
    assert result.total_seconds >= result.prompt_seconds + result.generation_seconds - 1e-6


def test_progress_is_reported_while_loading(make_runner):
    steps = []
    make_runner(load_ms=1, on_loading=lambda step, total: steps.append((step, total)))
    assert steps == [(i, protocol.LOAD_STEPS) for i in range(1, protocol.LOAD_STEPS + 1)]


def test_crash_mid_reply_is_a_typed_error(make_runner, tokenizer):
    runner = make_runner(fault="crash:4")
    with pytest.raises(CardDead, match="device 1 is dead"):
        runner.generate(prompt_ids(tokenizer, "hello"))
    assert not runner.usable


def test_exit_mid_reply_without_a_report(make_runner, tokenizer, tmp_path):
    runner = make_runner(token_ms=5)
    pieces = []

    def on_text(piece):
        if not pieces:
            runner.child.kill(9)
        pieces.append(piece)

    with pytest.raises(RunnerDied, match="signal 9"):
        runner.generate(prompt_ids(tokenizer, "count to 500"), on_text=on_text)


def test_hang_mid_reply_hits_the_stall_timeout(make_runner, tokenizer):
    runner = make_runner(fault="hang:4", stall_timeout=0.5)
    with pytest.raises(RunnerStalled):
        runner.generate(prompt_ids(tokenizer, "hello"))


@pytest.mark.parametrize("fault, message", [
    ("start_fail", "Set AXCL device failed"),
    ("no_permission", "Operation not permitted"),
])
def test_start_failure_is_one_clear_message(make_runner, fault, message):
    with pytest.raises(RunnerStartError, match=message) as caught:
        make_runner(fault=fault)
    assert "\n" not in str(caught.value)


def test_slow_start_past_the_timeout(make_runner):
    with pytest.raises(RunnerStartError, match="did not finish loading within 0.5 s"):
        make_runner(fault="slow_start", startup_timeout=0.5)


def test_missing_binary(service, tmp_path):
    from app.runner.driver import Runner
    with pytest.raises(RunnerStartError, match="cannot start the runner /nonexistent/main_axcl"):
        Runner(["/nonexistent/main_axcl"], service, tmp_path)


def test_close_quits_with_q(make_runner):
    runner = make_runner()
    runner.close()
    assert runner.child.exitstatus == 0 and not runner.child.isalive()


def test_back_to_back_interrupted_generations(runner, tokenizer):
    # Regression: a SIGINT sent through the pty (^C) is handled later by the line discipline, which then
    # discarded the next handle line (the runner waited forever) or interrupted the next generation.
    long_ids = prompt_ids(tokenizer, "count to 300")
    for i in range(40):
        limited, _ = generate(runner, long_ids, max_tokens=1 + i % 5)
        assert len(limited.ids) == 1 + i % 5
        follow, _ = generate(runner, prompt_ids(tokenizer, f"follow {i}"))
        assert follow.text == said(f"follow {i}") and follow.finish_reason == "stop"


WRITER = """
import signal, sys
signal.signal(signal.SIGINT, lambda *args: None)
print("READY", flush=True)
for i in range(100000):
    sys.stdout.write(f"<{i}>")
    sys.stdout.flush()
print("END", flush=True)
"""


def test_interrupting_never_loses_output_in_flight():
    # Regression: ^C through the pty made the terminal flush output the runner had written but we had
    # not read yet (~100 losses in this loop), so a printed chunk vanished and the generation stalled.
    import functools
    import os
    import re
    import sys

    import pexpect

    from app.runner.driver import child_setup, interrupt

    child = pexpect.spawn(sys.executable, ["-c", WRITER], echo=False, timeout=30, use_poll=True,
                          preexec_fn=functools.partial(child_setup, os.getpid()))
    child.expect_exact(b"READY")
    data = bytearray(child.buffer)
    interrupts = 0
    while b"END" not in data:
        try:
            data += child.read_nonblocking(1024, timeout=5)
        except pexpect.EOF:
            break
        if interrupts < 2000:
            interrupt(child)
            interrupts += 1
    numbers = [int(n) for n in re.findall(rb"<(\d+)>", data)]
    assert numbers == list(range(100000))
    assert interrupts >= 500  # it really interrupted, often, while output was flowing


def test_a_decode_answered_later_than_a_second_kills_the_runner(tokenizer, tmp_path):
    # docs/PROTOCOL.md: the vendor's loop dies by SIGSEGV when a /decode answer takes longer than 1 s. Here the
    # tokenizer service's own process is held (SIGSTOP) while the runner waits on one.
    from app.runner.driver import Runner
    from app.runner.tokenizer_service import TokenizerService
    service = TokenizerService(tokenizer).start()
    runner = None
    try:
        runner = Runner(emulator_command(tmp_path / "model", service.url), service, tmp_path,
                        env=emulator_env(tokenizer, token_ms=20))

        def hold_the_service(piece):
            if not hold_the_service.done:
                hold_the_service.done = True
                os.kill(service.pid, signal.SIGSTOP)
                threading.Timer(1.3, os.kill, (service.pid, signal.SIGCONT)).start()
        hold_the_service.done = False
        with pytest.raises(RunnerDied, match="SIGSEGV"):
            runner.generate(prompt_ids(tokenizer, "count to 100"), on_text=hold_the_service)
    finally:
        if runner is not None:
            runner.close()
        service.stop()


def test_the_window_is_what_the_runner_says(make_runner, tokenizer):
    # docs/PROTOCOL.md: the window is the layer models' mask size - 1, printed as max_token_len.
    runner = make_runner(mask=101)
    assert runner.window == 100
    ids = prompt_ids(tokenizer, "count to 100")
    result, _ = generate(runner, ids)
    assert result.finish_reason == "length" and len(result.ids) == 101 - len(ids)


def test_a_runner_stopped_at_its_prompt_is_found_out_within_seconds(make_runner, tokenizer):
    # It never fetches the prompt: the driver does not wait the stall timeout (30 s) to say so.
    runner = make_runner()
    os.kill(runner.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(RunnerStalled, match="did not fetch the prompt"):
        runner.generate(prompt_ids(tokenizer, "anyone?"))
    assert time.monotonic() - started < ENCODE_SECONDS + 2


def test_a_stop_string_completed_by_a_held_back_character(runner, tokenizer):
    # Regression: max_tokens cuts an emoji in half; the U+FFFD the decoder then releases completes the stop
    # string, after the last id (this raised StopIteration and restarted the runner).
    ids = prompt_ids(tokenizer, "🦩")
    full, _ = generate(runner, ids)
    cut = next(n for n in range(1, len(full.ids)) if tokenizer.decode(full.ids[:n]).endswith("\ufffd"))
    result, _ = generate(runner, ids, max_tokens=cut, stop=["\ufffd"])
    assert result.finish_reason == "stop" and "\ufffd" not in result.text
    assert len(result.ids) == cut


def test_a_cancel_that_comes_before_the_run_starts_still_stops_it(make_runner, tokenizer, tmp_path):
    # The runner clears its stop flag when a run starts: a SIGINT sent right after the handle line, before
    # that, was lost, and the generation ran to its end. The driver sends it again until the end notice comes.
    trace = tmp_path / "trace"
    runner = make_runner(token_ms=2, trace=trace)
    ids = prompt_ids(tokenizer, "count to 300")
    for _ in range(20):
        result = runner.generate(ids, cancelled=lambda: True)
        assert result.finish_reason == "cancelled"
    decodes = sum(line.startswith("decode ") for line in trace.read_text().splitlines())
    # Every run ends with one /decode of its output; a run to the end makes ~100 more (a chunk of 3 ids each).
    assert 20 <= decodes <= 20 * 3
    assert generate(runner, prompt_ids(tokenizer, "after"))[0].text == said("after")
