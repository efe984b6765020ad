"""One card, one driver: the thread that owns the runner and serves generations first come, first served.

A single long-lived thread spawns the runner (so PR_SET_PDEATHSIG, which fires when the *thread* that
forked exits, means "when this worker dies"), takes jobs from a FIFO queue one at a time, restarts the
runner with capped exponential backoff when it fails, and keeps the state /health reports. The Card also
owns the tokenizer service the runner calls back. A file lock under instance/ keeps a second process off
the same card.

People go before background work (titles, tags, follow-up suggestions...): the queue serves interactive
jobs first, and a background generation whose client has seen no text yet is interrupted when a person's
request arrives, then run again from the start.

A job tells its requester what happens through typed events: Started, then Text pieces, then Done, or
Failed at any point; Requeued when it was preempted (Started comes again when it runs again).
"""
import collections
import fcntl
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.runner.command import (check_embedding_writable, check_installation, choose_program, prepare_workdir,
                                runner_env)
from app.runner.driver import GenerationResult, Runner
from app.runner.errors import CardBusy, CardDead, CardUnavailable, QueueFull, RunnerError, RunnerStalled
from app.runner.tokenizer_service import TokenizerService
from app.runner import emulated_model, protocol
from app.text import traceback_without_message

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
CARD_SECONDS_PER_TOKEN = 1 / 14  # the LLM-8850's pace on a Raspberry Pi 5, prompt and output alike
PROBE_TIMEOUT_SECONDS = 5.0  # an idle runner prints its prompt within milliseconds of an empty line
UNAVAILABLE_AFTER_CRASHES = 3
INTERACTIVE, BACKGROUND = "interactive", "background"  # the two classes of requests


def internal_error(exc):
    """A bug of ours as a RunnerError. Its type only: an exception's message may quote a prompt, and this
    one reaches /health and other clients (the log line carries the traceback)."""
    return RunnerError(f"internal error ({type(exc).__name__})")


@dataclass(frozen=True)
class Started:
    """The card took the job."""


@dataclass(frozen=True)
class Text:
    """A piece of the answer, as the runner printed it."""
    text: str


@dataclass(frozen=True)
class Done:
    """The end of the job (also after a cancellation: result.finish_reason says "cancelled")."""
    result: GenerationResult


@dataclass(frozen=True)
class Requeued:
    """The job was preempted by a person's request, or the runner failed under it, before its client saw any
    text: it waits again, at the head of its class, and runs again from the start."""


@dataclass(frozen=True)
class Failed:
    """The job failed: a RunnerError, or CardUnavailable when it never ran."""
    error: Exception


@dataclass
class CardOptions:
    """How to run the card: the runner section of the settings, and where its files go."""
    model_dir: Path
    workdir: Path
    lock_path: Path
    binary: str = "auto"
    sampling: dict = field(default_factory=dict)
    emulator: dict = field(default_factory=dict)
    startup_timeout: float = 120.0
    stall_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    max_queue: int | None = None
    preempt: bool = True
    idle_probe_seconds: float = 30.0   # 0: never probe an idle runner

    @classmethod
    def from_settings(cls, settings, instance_path):
        runner = settings["runner"]
        return cls(model_dir=Path(settings["model"]["dir"]), workdir=Path(instance_path) / "runner",
                   lock_path=Path(instance_path) / "card.lock", binary=runner["binary"],
                   sampling=settings["sampling"], emulator=runner["emulator"],
                   startup_timeout=runner["startup_timeout"], stall_timeout=runner["stall_timeout"],
                   backoff_initial=runner["backoff_initial"], backoff_max=runner["backoff_max"],
                   idle_probe_seconds=runner["idle_probe_seconds"], max_queue=settings["server"]["max_queue"],
                   preempt=settings["scheduling"]["preempt"])


class PromptPace:
    """Seconds the card takes per prompt token, measured: each generation's time to its first text over its
    prompt (plus the two steps before the first chunk prints), smoothed; the runner's own "avg ... token/s"
    notice when a generation ended before any text. Until the first measurement, `prior`."""
    WEIGHT = 0.3      # of the newest measurement
    MIN_TOKENS = 8    # shorter prompts say more about overheads than about the pace

    def __init__(self, prior):
        self.seconds_per_token = prior
        self._measured = False

    def observe(self, result):
        if result.completion_tokens and result.prompt_tokens >= self.MIN_TOKENS:
            measured = result.prompt_seconds / (result.prompt_tokens + 2)
        elif result.runner_tokens_per_second:
            measured = 1.0 / result.runner_tokens_per_second
        else:
            return
        if not math.isfinite(measured) or measured <= 0:
            return
        weight = self.WEIGHT if self._measured else 1.0
        self.seconds_per_token += weight * (measured - self.seconds_per_token)
        self._measured = True


class Job:
    """One generation request: the card thread feeds its events, the request thread reads them."""

    def __init__(self, prompt_ids, max_tokens=None, stop=(), klass=INTERACTIVE, streamed=False, json_value=None):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.stop = list(stop or ())
        self.json_value = json_value  # "{" or "[": stop after the first complete JSON value (structured.py)
        self.klass = klass
        self.streamed = streamed      # its text goes to the client as it comes (else all at the end)
        self.retried = False          # card thread: it ran again once already, after the runner failed under it
        self.enqueued_at = time.monotonic()
        self.started_at = None        # card thread: when its (latest) run started...
        self.finished_at = None       # ...and ended, whatever the outcome
        self.text_sent = False        # card thread: some text went to the requester in this run
        self._events = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waiting_in = None  # the JobQueue holding it until the card takes it

    # request thread
    def cancel(self):
        """Give up: a waiting job leaves the line at once; a running one is interrupted."""
        self._cancelled.set()
        waiting_in = self._waiting_in
        if waiting_in is not None:
            waiting_in.remove(self)

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def next_event(self, timeout=None):
        """Started | Text | Done | Failed; None when `timeout` passes."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def result(self, timeout=None):
        """Wait for the end of the job; returns the result or raises its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.next_event(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if event is None:
                raise TimeoutError("the generation did not finish in time")
            if isinstance(event, Done):
                return event.result
            if isinstance(event, Failed):
                raise event.error

    # card thread
    def _put(self, event):
        self._events.put(event)


class JobQueue:
    """Interactive jobs before background ones, first come first served within each class; a job that gives
    up leaves the line at once (its place is free)."""

    def __init__(self):
        self._lines = {INTERACTIVE: collections.deque(), BACKGROUND: collections.deque()}
        self._changed = threading.Condition()
        self.closed = False

    def __len__(self):
        return len(self._lines[INTERACTIVE]) + len(self._lines[BACKGROUND])

    def depth(self, klass):
        return len(self._lines[klass])

    def put(self, job, limit=None):
        """Queue a job. When `limit` jobs already wait, an interactive job takes the place of the newest
        background one (returned, for its requester to be told), and anything else raises QueueFull: a
        person is never turned away for background work."""
        with self._changed:
            if self.closed:
                raise CardUnavailable("the service is shutting down")
            evicted = None
            if limit is not None and len(self) >= limit:
                if job.klass == BACKGROUND or not self._lines[BACKGROUND]:
                    raise QueueFull(f"{len(self)} requests are already waiting for the card", 5)
                evicted = self._lines[BACKGROUND].pop()
                evicted._waiting_in = None
            job._waiting_in = self
            self._lines[job.klass].append(job)
            self._changed.notify()
            return evicted

    def requeue(self, job):
        """Put a preempted job back at the head of its class: it keeps its place (unless it gave up
        meanwhile: Job.cancel() found it in no line, so it must not go back in one)."""
        with self._changed:
            if job.cancelled:
                return
            job._waiting_in = self
            self._lines[job.klass].appendleft(job)
            self._changed.notify()

    def get(self, timeout):
        """The next job, or None after `timeout` seconds or once closed."""
        with self._changed:
            self._changed.wait_for(lambda: len(self) or self.closed, timeout)
            if not len(self) or self.closed:
                return None
            line = self._lines[INTERACTIVE] or self._lines[BACKGROUND]
            job = line.popleft()
            job._waiting_in = None
            return job

    def position(self, job):
        """How many jobs the card will take before this one (0: it is next); None once it is not waiting."""
        with self._changed:
            interactive, background = self._lines[INTERACTIVE], self._lines[BACKGROUND]
            if job.klass == INTERACTIVE:
                return interactive.index(job) if job in interactive else None
            return len(interactive) + background.index(job) if job in background else None

    def remove(self, job):
        with self._changed:
            try:
                self._lines[job.klass].remove(job)
            except ValueError:
                pass  # the card took it first
            job._waiting_in = None

    def close(self):
        """Stop handing out jobs; returns the ones still waiting."""
        with self._changed:
            self.closed = True
            return self._take_all()

    def drain(self):
        with self._changed:
            return self._take_all()

    def _take_all(self):
        jobs = [*self._lines[INTERACTIVE], *self._lines[BACKGROUND]]
        for line in self._lines.values():
            line.clear()
        self._changed.notify_all()
        return jobs


class Card:
    """The runner's supervisor. `submit()` from any thread; everything else happens on the card thread."""

    def __init__(self, tokenizer, options):
        self.tokenizer = tokenizer
        self.options = options
        self.service = TokenizerService(tokenizer)
        self.program = choose_program(options.binary, options.model_dir)
        prior = options.emulator.get("token_ms", 70) / 1000 if self.program.emulated else CARD_SECONDS_PER_TOKEN
        self._pace = PromptPace(prior or 0.001)

        self._queue = JobQueue()
        self._stopping = threading.Event()
        self._thread = None
        self._lock_file = None
        self.runner = None
        # State for /health and /metrics; written by the card thread only.
        self._state_changed = threading.Condition()
        self._state = "starting"      # starting | loading | ready | unavailable | stopped
        self.progress = (0, protocol.LOAD_STEPS)
        self.reason = None            # why the card is unavailable, or the last failure
        self.restarts = 0             # runner starts after the first one
        self._started_once = False
        self.failures = 0             # consecutive failures (start-up or mid-generation)
        self.busy = False
        self.preemptions = 0          # background generations interrupted for a person
        self.retries = 0              # generations run again after the runner failed under them
        self._last_active = time.monotonic()  # the runner last answered (a generation or a probe)
        self.retry_at = None

    # -- public ---------------------------------------------------------------------------------------
    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, value):
        with self._state_changed:
            self._state = value
            self._state_changed.notify_all()

    @property
    def emulated(self):
        return self.program.emulated

    @property
    def npu(self):
        if self.state == "unavailable":
            return "unavailable"
        return "emulated" if self.emulated else "available"

    @property
    def queue_depth(self):
        return len(self._queue)

    def queue_depths(self):
        return {klass: self._queue.depth(klass) for klass in (INTERACTIVE, BACKGROUND)}

    def position(self, job):
        """How many jobs the card takes before `job` (0: next); None once it is not waiting."""
        return self._queue.position(job)

    def seconds_per_prompt_token(self):
        """The card's measured pace reading a prompt (the runner prints nothing meanwhile)."""
        return self._pace.seconds_per_token

    def start(self):
        self.service.start()
        self._thread = threading.Thread(target=self._run, name="card", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=30.0):
        self._stopping.set()
        for job in self._queue.close():
            job._put(Failed(CardUnavailable("the service is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
        self.service.stop()

    def submit(self, prompt_ids, max_tokens=None, stop=(), klass=INTERACTIVE, streamed=False, json_value=None):
        """Queue a generation; raises CardUnavailable (QueueFull) at once when the card cannot take it."""
        if self._stopping.is_set() or self.state == "stopped":
            raise CardUnavailable("the service is shutting down")
        if self.state == "unavailable":
            raise CardUnavailable(self.reason or "the card is unavailable", self._retry_after())
        job = Job(prompt_ids, max_tokens, stop, klass, streamed, json_value)
        evicted = self._queue.put(job, self.options.max_queue)
        if evicted is not None:
            evicted._put(Failed(QueueFull("a person's request took the place of this background request", 5)))
        return job

    def wait_ready(self, timeout):
        """For tests and start-up scripts: wait until the runner is at its prompt (or the card gave up)."""
        with self._state_changed:
            self._state_changed.wait_for(lambda: self._state in ("ready", "unavailable"), timeout)
            return self._state

    # -- card thread ----------------------------------------------------------------------------------
    def _run(self):
        try:
            while not self._stopping.is_set():
                try:
                    self._step()
                except Exception as exc:  # a bug of ours must not end the only thread that drives the card
                    log.error("card thread: %s", traceback_without_message(exc))
                    self._drop_runner()
                    self._failed(internal_error(exc), unavailable=False)
                    self._fail_waiting_jobs()
        finally:
            self._shutdown()

    def _step(self):
        """Start the runner if there is none, else serve the next job, or look after the idle runner."""
        if self.runner is None:
            self._sleep_until_retry()
            if not self._stopping.is_set() and not self._start_runner():
                self._fail_waiting_jobs()
            return
        job = self._queue.get(IDLE_CHECK_SECONDS)
        if job is None:
            if not self._stopping.is_set():
                self._check_idle()
        elif not job.cancelled:
            self._serve(job)
            self._last_active = time.monotonic()

    def _start_runner(self):
        if self.state != "unavailable":  # while it retries, a failed card answers 503 at once
            self.state = "loading"
        self.progress = (0, protocol.LOAD_STEPS)
        try:
            self._take_lock()
            self.service.ensure_running()  # a service that ended or hangs would kill the runner at its first call
            options = self.options
            model_dir = options.model_dir
            if self.program.emulated and not emulated_model.present(model_dir):
                # No model here: the emulator opens a folder of stand-ins as the runner opens the real one.
                model_dir = emulated_model.write(options.workdir.parent / "emulated-model")
            if not self.program.emulated:
                check_installation(self.program, model_dir)
            check_embedding_writable(model_dir)
            prepare_workdir(options.workdir, options.sampling)
            command = self.program.argv_prefix + protocol.vendor_flags(model_dir, self.service.url)
            env = runner_env(self.program, options.emulator, self.tokenizer.folder)
            log.info("starting the runner: %s", self.program.description)
            self.runner = Runner(command, self.service, options.workdir, env=env,
                                 startup_timeout=options.startup_timeout, stall_timeout=options.stall_timeout,
                                 on_progress=self._on_progress, abort=self._stopping.is_set)
        except RunnerError as exc:
            self._failed(exc, unavailable=True)
            return False
        log.info("runner ready (pid %s, %s)", self.runner.pid, self.program.description)
        self._last_active = time.monotonic()
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        self.state = "ready"
        self.reason = None
        self.retry_at = None
        return True

    def _on_progress(self, step, total):
        self.progress = (step, total)

    def _serve(self, job):
        job.started_at = time.monotonic()
        job.text_sent = False
        job._put(Started())
        self.busy = True
        preempted = False

        def on_text(text):
            job.text_sent = True
            job._put(Text(text))

        def should_stop():
            nonlocal preempted
            if job.cancelled or self._stopping.is_set():
                return True
            # A person waits, and this background job's client has seen nothing yet: it can run again later.
            if (self.options.preempt and job.klass == BACKGROUND and not (job.streamed and job.text_sent)
                    and self._queue.depth(INTERACTIVE)):
                preempted = True
            return preempted

        try:
            result = self.runner.generate(job.prompt_ids, max_tokens=job.max_tokens, stop=job.stop,
                                          on_text=on_text, cancelled=should_stop, json_value=job.json_value)
        except RunnerError as exc:
            self._drop_runner(force=isinstance(exc, RunnerStalled))
            self._failed(exc, unavailable=isinstance(exc, CardDead))
            if not job.retried and not job.cancelled and not (job.streamed and job.text_sent) \
                    and self.state != "unavailable":
                # Its client has seen nothing: it waits for the new runner and runs again, once, from the start.
                job.retried = True
                self.retries += 1
                log.info("a generation the runner failed under will run again once the runner is back")
                job._put(Requeued())
                self._queue.requeue(job)
            else:
                job._put(Failed(exc))
        except Exception as exc:  # a bug of ours: the runner's state is unknown, so restart it
            log.error("generation failed: %s", traceback_without_message(exc))
            error = internal_error(exc)
            job._put(Failed(error))
            self._drop_runner()
            self._failed(error, unavailable=False)
        else:
            self.failures = 0
            self._pace.observe(result)
            if preempted and result.finish_reason == "cancelled" and not job.cancelled:
                self.preemptions += 1
                log.info("a background generation gave way to a person's request; it will run again")
                job._put(Requeued())
                self._queue.requeue(job)
            else:
                job._put(Done(result))
        finally:
            job.finished_at = time.monotonic()
            self.busy = False

    def _check_idle(self):
        """Between jobs: a runner that died or reported the card dead is restarted; one that no longer answers
        at its prompt (runner.idle_probe_seconds) is killed and restarted before a person needs it."""
        interval = self.options.idle_probe_seconds
        try:
            if interval and time.monotonic() - self._last_active >= interval:
                self.runner.probe(PROBE_TIMEOUT_SECONDS)
                self._last_active = time.monotonic()
            else:
                self.runner.check_idle()
        except RunnerError as exc:
            self._drop_runner(force=isinstance(exc, RunnerStalled))
            self._failed(exc, unavailable=isinstance(exc, CardDead))

    def _failed(self, exc, unavailable):
        self.failures += 1
        self.reason = str(exc)
        delay = min(self.options.backoff_initial * 2 ** (self.failures - 1), self.options.backoff_max)
        self.retry_at = time.monotonic() + delay
        if unavailable or self.failures >= UNAVAILABLE_AFTER_CRASHES:
            self.state = "unavailable"
        elif self.state != "unavailable":
            self.state = "loading"  # restarting
        log.error("%s (failure %d in a row; next start in %.1f s)", exc, self.failures, delay)

    def _drop_runner(self, force=False):
        if self.runner is not None:
            self.runner.close(force=force)
            self.runner = None

    def _retry_after(self):
        if self.retry_at is None:
            return None
        return max(1, int(self.retry_at - time.monotonic() + 0.999))

    def _sleep_until_retry(self):
        while not self._stopping.is_set() and self.retry_at is not None and time.monotonic() < self.retry_at:
            self._stopping.wait(min(0.2, self.retry_at - time.monotonic()))

    def _fail_waiting_jobs(self, reason=None):
        for job in self._queue.drain():
            job._put(Failed(CardUnavailable(reason or self.reason or "the card is unavailable",
                                            self._retry_after())))

    def _take_lock(self):
        if self._lock_file is not None:
            return
        lock_path = self.options.lock_path
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise CardBusy(f"another process (pid {holder}) is driving the card: {lock_path} is locked; "
                           "one card takes one qwen-chat process") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

    def _shutdown(self):
        self._drop_runner()
        self._fail_waiting_jobs("the service is shutting down")
        self.state = "stopped"
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
