"""Drive main_axcl (or its emulation) through pexpect: one class, one verb.

`Runner(...)` spawns the runner under a pty and waits for its prompt; `Runner.generate(...)` runs one
prompt and returns its result. The Runner keeps only the child process; each generation's limits, output,
decode log, callbacks and timings live in a `Generation`. The design follows docs/PROTOCOL.md's traps:

- The prompt never goes to stdin: the tokenizer service registers it and we write one short handle line.
- The end of a generation is found only as the `hit eos` notice followed by `>> `, and only where every
  byte before it is text the tokenizer service answered to /decode (the runner prints exactly those
  answers; the service reports each answer before the runner has it, and the driver polls those reports
  beside the pty). So model text containing `>> `, blank lines or `hit eos` comes back byte-exact.
- Output ids come from the /decode calls, so `max_tokens` is exact: SIGINT once enough ids exist, and the
  ids and text past the limit are dropped; so is text past a cut (stop strings, or any cutter: cutters.py).
- Only new bytes are scanned (no regex over an ever-growing buffer), at fixed positions.
- The pty translates nothing (ONLCR off, echo off) and the runner dies with its parent (PR_SET_PDEATHSIG,
  armed from the long-lived thread that spawns it; see card.py).
- The tokenizer service serves the runner's process and no other: the Runner admits the pid it spawned, and
  dismisses it when it closes the runner (see peer.py).
"""
import ctypes
import errno
import functools
import logging
import math
import os
import select
import signal
import termios
import time
from dataclasses import dataclass

import pexpect

from app.runner import protocol
from app.runner.errors import CardDead, RunnerDied, RunnerStalled, RunnerStartError
from app.runner.cutters import StopStrings
from app.text import printable

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05          # how often a quiet generation checks for cancellation and stalls
ENCODE_SECONDS = 5.0         # the runner fetches the prompt within milliseconds of its handle line; else it hangs
REINTERRUPT_SECONDS = 0.3    # an interrupt not followed by the end notice within this is sent again
PREFILL_SECONDS_PER_TOKEN = 0.25  # prompt tokens are fed one per step (~70 ms on the card); allow 3.5x that
CLOSE_GRACE_SECONDS = 5.0
READ_SIZE = 65536

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class GenerationResult:
    text: str
    ids: list
    finish_reason: str            # "stop" (eos or a stop string), "length" (max_tokens or window), "cancelled"
    prompt_tokens: int
    prompt_seconds: float = 0.0   # handle written -> first output id (time to first token)
    generation_seconds: float = 0.0  # first output id -> end
    total_seconds: float = 0.0
    stop_sequence: str | None = None
    runner_tokens_per_second: float | None = None  # the runner's own "avg ... token/s" (prompt and output)

    @property
    def completion_tokens(self):
        return len(self.ids)

    @property
    def tokens_per_second(self):
        if len(self.ids) > 1 and self.generation_seconds > 0:
            return (len(self.ids) - 1) / self.generation_seconds
        return 0.0


class Generation:
    """One prompt run on the runner: its limits, the output taken so far, its decode log, the caller's
    callbacks, and its timings. The Runner reads the child; this object decides what the bytes mean."""

    def __init__(self, decode_log, decoder, max_tokens, cutters, on_text, cancelled, interrupt,
                 window=protocol.MAX_TOKEN_LEN):
        self.decode_log = decode_log    # the tokenizer service's record of this prompt's /decode calls
        self.prompt_ids = decode_log.prompt_ids
        self.window = window            # the runner's, from its banner
        self.max_tokens = max_tokens
        self.cutters = list(cutters)    # where the answer ends before the model ends it (cutters.py)
        self._decoder = decoder
        self._on_text = on_text
        self._cancelled = cancelled
        self._interrupt_runner = interrupt
        # Output taken so far, within the limits.
        self.taken = 0                  # /decode calls accounted for
        self.ids = []                   # ids kept for the result
        self.text = ""
        self._id_text_end = []          # len(text) once each kept id was decoded
        self._emitted = 0               # chars of text passed to on_text
        self._truncated = False         # ids were dropped at max_tokens
        # Why it ended early: set when we interrupt ("length", "stop" or "cancelled").
        self.reason = None
        self._interrupted_at = None
        self._cut = None                # the first Cut a cutter found
        self._cut_ids_at = None         # ids up to the one that completed it
        # Timings (monotonic).
        self.started = time.monotonic()
        self.first_id_at = None
        self.ended = None
        self.runner_tokens_per_second = None  # the runner's own figure, from its end notice

    # -- as the runner prints ------------------------------------------------------------------------
    def take_call(self, call, now):
        """The runner printed (or skipped) one /decode answer: its ids are output."""
        self.taken += 1
        self._take(call.ids, now)

    def _take(self, ids, now, may_interrupt=True):
        """Decode ids one by one within the limits, and emit the settled text."""
        if self.first_id_at is None and ids:
            self.first_id_at = now
        if self.reason is not None:
            return  # interrupted: what still arrives is past the limit
        for token_id in ids:
            if self.max_tokens is not None and len(self.ids) >= self.max_tokens:
                self._truncated = True
                break
            self.ids.append(token_id)
            self.text += self._decoder.push([token_id])
            self._id_text_end.append(len(self.text))
        self._apply_cutters(may_interrupt)
        self._emit(final=False)

    def check_limits(self):
        """Interrupt the runner when the client has gone or max_tokens is reached; and again when the interrupt
        may have been lost. The runner clears its stop flag when a run starts, so a SIGINT that arrived
        between our handle line and that moment did nothing: it is sent again once the runner has fetched the
        prompt (its run has begun), and every REINTERRUPT_SECONDS until the end notice comes (one that arrives
        at the prompt is harmless; a generation that runs to its end is not)."""
        if self.reason is None and self._cancelled is not None and self._cancelled():
            self._interrupt("cancelled")
        if self.reason is None and self.max_tokens is not None and len(self.ids) >= self.max_tokens:
            self._interrupt("length")
        if self.reason is not None:
            began = self.decode_log.encoded_at
            if ((began is not None and began > self._interrupted_at)
                    or time.monotonic() - self._interrupted_at >= REINTERRUPT_SECONDS):
                self._interrupt(self.reason)

    def end(self, now, runner_tps):
        self.ended = now
        try:
            figure = float(runner_tps)
        except ValueError:
            return
        if math.isfinite(figure) and figure > 0:  # "nan", "inf": the runner had nothing to measure
            self.runner_tokens_per_second = figure

    def _interrupt(self, reason):
        self.reason = reason
        self._interrupted_at = time.monotonic()
        self._interrupt_runner()

    def _apply_cutters(self, may_interrupt):
        """Cut the text where the first cutter says (before a stop string, after a JSON value...)."""
        if self._cut is not None:
            return
        cuts = [cut for cutter in self.cutters if (cut := cutter.scan(self.text, self._emitted)) is not None]
        if not cuts:
            return
        self._cut = min(cuts, key=lambda cut: cut.at)
        # Count the ids up to the one that completed the match, as OpenAI and vLLM count them.
        # (The text past the last id is what the decoder held back and released at the end.)
        self._cut_ids_at = next((i + 1 for i, e in enumerate(self._id_text_end) if e >= self._cut.end),
                                len(self.ids))
        if may_interrupt and self.reason is None:
            self._interrupt("stop")

    def _emit(self, final):
        """Pass on the text that is settled: never past a cut, never what could still begin one."""
        if self._cut is not None:
            end = self._cut.at
        else:
            end = len(self.text) - (0 if final else max((c.hold(self.text) for c in self.cutters), default=0))
        if end > self._emitted:
            piece = self.text[self._emitted:end]
            self._emitted = end
            if self._on_text is not None:
                self._on_text(piece)

    # -- at the end ----------------------------------------------------------------------------------
    def result(self):
        calls = self.decode_log.calls()
        # The runner's last /decode carries all output ids, including the 1-2 it never printed when the
        # window ended it. Keep them (within the limits) so the result holds every output id.
        if calls and calls[-1].maybe_final and self.reason is None:
            self._take(calls[-1].ids[len(self.ids):], self.ended, may_interrupt=False)
        self.text += self._decoder.finish()
        self._apply_cutters(may_interrupt=False)
        window = self.window + 1 - len(self.prompt_ids)
        if self.reason == "cancelled":
            reason = "cancelled"
        elif self._cut is not None:
            self.text = self.text[:self._cut.at]
            self.ids = self.ids[:self._cut_ids_at]
            reason = "stop"
        elif self.reason == "length" or self._truncated or len(self.ids) >= window:
            reason = "length"
        else:
            reason = "stop"  # the model's end of turn
        self._emit(final=True)
        first = self.first_id_at or self.ended
        return GenerationResult(
            text=self.text, ids=list(self.ids), finish_reason=reason,
            prompt_tokens=len(self.prompt_ids), prompt_seconds=first - self.started,
            generation_seconds=self.ended - first, total_seconds=self.ended - self.started,
            stop_sequence=self._cut.stop_sequence if reason == "stop" and self._cut is not None else None,
            runner_tokens_per_second=self.runner_tokens_per_second)


def raise_if_dead(data):
    """The one dead-card check: CardDead when the runner's output reports the card dead."""
    match = protocol.DEAD_CARD_RE.search(data)
    if match:
        raise CardDead("the card is dead: " + match.group(0).decode("ascii"))


def child_setup(parent_pid, fd_in=0):
    """Runs in the forked child before exec: die with the parent, raw output, default signals."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # the parent died before the guard was armed
        os._exit(1)
    # Keep the runner's bytes as they are: no "\n" -> "\r\n" on output. And NOFLSH: an interrupt
    # character must never make the terminal discard output the runner wrote and we have not read.
    attrs = termios.tcgetattr(fd_in)
    attrs[1] &= ~termios.ONLCR
    attrs[3] |= termios.NOFLSH
    termios.tcsetattr(fd_in, termios.TCSANOW, attrs)
    # Python ignores SIGPIPE, and ignored signals survive exec; the runner gets the defaults.
    for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def interrupt(child):
    """SIGINT to the runner's process group (what Ctrl+C does), delivered now.

    Not pexpect's sendintr(): a ^C written to the pty is acted on later by the line discipline, which
    (without NOFLSH) throws away output the runner wrote that we have not read yet - a printed chunk
    vanished and the generation could never be accounted for - and may deliver the signal after the next
    prompt has started.
    """
    try:
        os.killpg(child.pid, signal.SIGINT)
    except ProcessLookupError:
        pass


class Runner:
    """A running main_axcl at its `>> ` prompt."""

    def __init__(self, command, service, cwd, env=None, startup_timeout=120.0, stall_timeout=30.0,
                 on_loading=None, abort=lambda: False):
        self.command = list(command)
        self.service = service
        self.stall_timeout = stall_timeout
        self.usable = False
        self._leftover = bytearray()   # bytes read after a prompt, before the next generation
        try:
            # Only this process may call the tokenizer service; its first calls may come before spawn returns.
            with service.peers.spawning() as admit:
                self.child = pexpect.spawn(
                    self.command[0], self.command[1:], cwd=str(cwd), env=env, echo=False, encoding=None,
                    timeout=None, use_poll=True, dimensions=(24, 4000),
                    preexec_fn=functools.partial(child_setup, os.getpid()))
                admit(self.child.pid)
        except pexpect.ExceptionPexpect as exc:
            raise RunnerStartError(f"cannot start the runner {self.command[0]}: {exc}") from None
        except OSError as exc:
            raise RunnerStartError(f"cannot start the runner {self.command[0]}: {exc.strerror or exc}") from None
        self.child.delaybeforesend = None  # pexpect sleeps 50 ms before every send by default
        self.pid = self.child.pid
        self.window = protocol.MAX_TOKEN_LEN  # until the banner says (the model's mask size - 1)
        # One poll for the runner's terminal and the service's reports: a chunk's report always comes before
        # the runner prints it, and both are taken as soon as either arrives.
        try:
            self._service_fd = service.fileno()
            self._poller = select.poll()
            self._poller.register(self.child.child_fd, select.POLLIN)
            self._poller.register(self._service_fd, select.POLLIN)
            self._wait_until_ready(startup_timeout, on_loading, abort)
        except BaseException:
            self.close()
            raise
        self.usable = True

    # -- reading ----------------------------------------------------------------------------------------
    def _read(self, timeout):
        """What the runner printed, waiting up to `timeout` s for it: b"" if nothing came; pexpect.EOF once
        the runner is gone.

        pexpect spawned the runner and owns its pty; reading the pty here with one poll object costs a poll
        and a read per chunk, where read_nonblocking spends up to three polls and a waitpid - on the path of
        every streamed chunk.
        """
        ready = dict(self._poller.poll(timeout * 1000))
        if self._service_fd in ready:
            self.service.pump()
            if not self.service.running:  # its process ended: nothing more will come from it
                self._poller.unregister(self._service_fd)
                self._service_fd = None
        if self.child.child_fd not in ready:
            return b""
        try:
            data = os.read(self.child.child_fd, READ_SIZE)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's other side is closed, the runner has exited
                raise
            data = b""
        if not data:
            raise pexpect.EOF("the runner's terminal closed")
        return data

    # -- start-up -------------------------------------------------------------------------------------
    def _wait_until_ready(self, timeout, on_loading, abort):
        deadline = time.monotonic() + timeout
        seen = bytearray()
        scanned = 0  # progress steps before this offset have been reported
        while True:
            if abort():
                raise RunnerStartError("start-up abandoned: the service is stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerStartError(
                    f"the runner did not finish loading within {timeout:g} s{self._last_words(seen)}")
            try:
                seen += self._read(min(remaining, 1.0))
            except pexpect.EOF:
                raise RunnerStartError(self._start_failure(seen)) from None
            # Progress bar steps ("| 12 /  31 ["), reported as they complete; each is scanned once.
            for match in protocol.PROGRESS_RE.finditer(seen, scanned):
                scanned = match.end()
                if on_loading is not None:
                    on_loading(int(match.group(1)), int(match.group(2)))
            raise_if_dead(seen)
            ready = seen.find(protocol.READY_PROMPT)
            if ready >= 0 and protocol.INIT_OK in seen:
                self._leftover = seen[ready + len(protocol.READY_PROMPT):]
                window = protocol.WINDOW_RE.search(seen)
                if window:
                    self.window = int(window.group(1))
                return

    def _start_failure(self, seen):
        status = self._exit_status()
        errors = [m.group(1).decode("utf-8", "replace").strip() for m in protocol.ERROR_LINE_RE.finditer(seen)]
        errors += [line.decode("utf-8", "replace").strip() for line in seen.splitlines()
                   if b"errno" in line or b"Operation not permitted" in line]
        if errors:
            return f"the runner failed to start ({status}): " + "; ".join(dict.fromkeys(errors))
        return f"the runner exited during start-up ({status}){self._last_words(seen)}"

    @staticmethod
    def _last_words(seen):
        tail = bytes(seen[-300:]).decode("utf-8", "replace")
        tail = "".join(ch for ch in tail if ch.isprintable() or ch == "\n").strip().splitlines()
        return f"; last output: {tail[-1]!r}" if tail else ""

    def _exit_status(self, wait_seconds=2.0):
        """How the runner ended, for messages; waits briefly for it to be reapable."""
        deadline = time.monotonic() + wait_seconds
        while self.child.isalive():
            if time.monotonic() > deadline:
                return "still running, output closed"
            time.sleep(0.01)
        if self.child.signalstatus == signal.SIGSEGV:
            # docs/PROTOCOL.md: what the vendor's loop does when a tokenizer call is refused or late.
            return ("killed by signal 11, SIGSEGV: main_axcl crashes so when a call to the tokenizer service is "
                    "refused or answered later than 1 s")
        if self.child.signalstatus is not None:
            return f"killed by signal {self.child.signalstatus}"
        return f"exit status {self.child.exitstatus}"

    # -- the verb -------------------------------------------------------------------------------------
    def generate(self, prompt_ids, max_tokens=None, stop=(), on_text=None, cancelled=None, cutters=()):
        """Run one prompt. Returns a GenerationResult; raises a RunnerError if the runner fails.

        `max_tokens` caps the output ids (None: the window decides); `stop` holds up to 4 strings that end
        the text before their first match, and `cutters` other ends (cutters.py); `on_text(str)` receives the
        text as it is printed (never past a cut or the limit, so the pieces join to the result's text);
        `cancelled()` is polled, and when it turns true the runner is interrupted and freed and the result says
        "cancelled".
        """
        if not self.usable:
            raise RunnerDied("the runner is not usable after an earlier failure")
        self.usable = False  # until this generation ends cleanly
        decode_log = self.service.register(prompt_ids)
        generation = Generation(decode_log, self.service.tokenizer.incremental_decoder(), max_tokens,
                                [StopStrings(stop), *cutters], on_text, cancelled,
                                interrupt=lambda: interrupt(self.child), window=self.window)
        try:
            try:
                self.child.send(decode_log.handle.encode("ascii") + b"\n")
            except OSError as exc:
                raise RunnerDied(f"the runner's terminal is gone: {exc}") from None
            self._stream(generation)
        finally:
            self.service.forget(decode_log)
        result = generation.result()
        self.usable = True
        return result

    def _stream(self, generation):
        """Read the runner until the end marker (which sets generation.ended)."""
        buf = self._leftover
        self._leftover = bytearray()
        calls_seen = 0
        last_activity = generation.started
        prefill_allowance = len(generation.prompt_ids) * PREFILL_SECONDS_PER_TOKEN
        while True:
            self.service.pump()  # reports already sent: a chunk's comes before the runner prints it
            pos, state = self._account(buf, generation)
            if state == "ended":
                return
            del buf[:pos]  # only bytes not yet accounted for are kept, and scanned again
            if state == "unknown":
                raise_if_dead(buf)
            generation.check_limits()  # interrupts when a limit is reached or the client has gone

            # Wait for more output, within the stall timeout (generous while the prompt is fed).
            now = time.monotonic()
            total_calls = generation.decode_log.call_count
            if total_calls != calls_seen:
                calls_seen, last_activity = total_calls, now
            if generation.decode_log.encoded_at is None and now - generation.started > ENCODE_SECONDS:
                # Stopped, or stuck in the card's driver, before it even read the line.
                raise RunnerStalled(f"the runner did not fetch the prompt within {ENCODE_SECONDS:g} s of its "
                                    "handle line")
            allowance = self.stall_timeout + (prefill_allowance if generation.first_id_at is None else 0)
            if now - last_activity > allowance:
                pending = generation.decode_log.calls(generation.taken)
                # Counts only: this message reaches /health, the log and other clients.
                raise RunnerStalled(
                    f"the runner printed nothing we could account for in {now - last_activity:.0f} s while "
                    f"generating ({len(buf)} bytes of unaccounted output; {len(pending)} /decode answers not "
                    "yet seen)")
            try:
                data = self._read(POLL_SECONDS)
            except pexpect.EOF:
                raise_if_dead(buf)
                raise RunnerDied(f"the runner exited while generating ({self._exit_status()})") from None
            if data:
                buf += data
                last_activity = time.monotonic()

    def _account(self, buf, generation):
        """Match the bytes in `buf` against the answered /decode calls, in order.

        Returns (bytes accounted for, state): "ended" once the end marker is matched, "partial" while a chunk
        is still arriving or an empty answer is undecided, "unknown" when bytes that are neither text nor a
        known line wait there (a dead card's report, say). Calls accounted for count in generation.taken.
        """
        pos = 0
        while True:
            calls = generation.decode_log.calls(generation.taken)
            if calls and calls[0].maybe_final:
                # The runner's last /decode comes after the notice: if the marker is here, that was it.
                if protocol.END_RE.match(buf, pos):
                    return self._ended(buf, pos, generation), "ended"
                if not calls[0].printed and len(calls) == 1:
                    return pos, "partial"  # live or final? the next call or the marker will say
            elif not calls and protocol.END_RE.match(buf, pos):
                return self._ended(buf, pos, generation), "ended"
            if calls:
                printed = calls[0].printed.encode("utf-8")
                if buf.startswith(printed, pos):
                    pos += len(printed)
                    generation.take_call(calls[0], time.monotonic())
                    continue
                if printed.startswith(bytes(buf[pos:])):
                    return pos, "partial"
            line_end = self._stray_line_end(buf, pos)
            if line_end is None:
                return pos, ("unknown" if pos < len(buf) else "partial")
            pos = line_end

    def _ended(self, buf, pos, generation):
        match = protocol.END_RE.match(buf, pos)
        self._leftover = buf[match.end():]
        generation.end(time.monotonic(), match.group("tps"))
        return match.end()

    @staticmethod
    def _stray_line_end(buf, pos):
        """End of a whole log line the runner printed on its own at `pos` (never text, never the notice)."""
        for pattern in (protocol.VENDOR_LOG_RE, protocol.RUNTIME_LOG_RE):
            match = pattern.match(buf, pos)
            if match:
                line = bytes(match.group(0))
                raise_if_dead(line)
                log.warning("runner: %s", printable(line.decode("utf-8", "replace").strip()))
                return match.end()
        return None

    # -- idle and shutdown ----------------------------------------------------------------------------
    def check_idle(self):
        """Between generations: raise if the runner died or reported the card dead while waiting."""
        if not self.usable:
            raise RunnerDied("the runner is not usable after an earlier failure")
        try:
            self._leftover += self._read(0)
        except pexpect.EOF:
            self.usable = False
            raise RunnerDied(f"the runner exited while idle ({self._exit_status()})") from None
        try:
            raise_if_dead(self._leftover)
        except CardDead:
            self.usable = False
            raise

    def probe(self, timeout):
        """Between generations: an empty line makes the runner print its prompt again. A runner that does not
        within `timeout` seconds is hung (stopped, or stuck in the card's driver): RunnerStalled, before a
        person's request finds out."""
        self.check_idle()
        try:
            self.child.send(b"\n")
        except OSError as exc:
            self.usable = False
            raise RunnerDied(f"the runner's terminal is gone: {exc}") from None
        deadline = time.monotonic() + timeout
        seen = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.usable = False
                raise RunnerStalled(f"the runner did not answer at its prompt within {timeout:g} s while idle")
            try:
                seen += self._read(min(remaining, POLL_SECONDS))
            except pexpect.EOF:
                self.usable = False
                raise RunnerDied(f"the runner exited while idle ({self._exit_status()})") from None
            at = seen.find(protocol.PROMPT)
            if at >= 0:
                # The prompt answers the probe; anything else (a log line, say) is kept for the next generation.
                self._leftover += seen[:at] + seen[at + len(protocol.PROMPT):]
                try:
                    raise_if_dead(self._leftover)
                except CardDead:
                    self.usable = False
                    raise
                return

    def close(self, force=False):
        """`q`, then SIGTERM and SIGKILL to the runner's process group; always reaps it. `force`: SIGKILL at
        once (a hung runner answers neither `q` nor SIGTERM, and each would cost a grace period)."""
        self.usable = False
        child = self.child
        if child.isalive():
            if not force:
                try:
                    child.send(b"q\n")
                except OSError:
                    pass
            for sig in (signal.SIGKILL,) if force else (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        os.killpg(child.pid, sig)
                    except ProcessLookupError:
                        break
                if self._exited_within(CLOSE_GRACE_SECONDS if sig != signal.SIGKILL else 10.0):
                    break
        try:
            child.close(force=True)
        except pexpect.ExceptionPexpect:
            pass
        self.service.peers.dismiss(child.pid)

    def _exited_within(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._read(0.1)  # drain, so a runner blocked on a full terminal can finish
            except (pexpect.EOF, OSError):
                pass
            if not self.child.isalive():
                return True
        return False
