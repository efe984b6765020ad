"""One card, one driver: the thread that owns the runner and serves generations first come, first served.

A single long-lived thread spawns the runner (so PR_SET_PDEATHSIG, which fires when the *thread* that
forked exits, means "when this worker dies"), takes jobs from a FIFO queue one at a time, restarts the
runner with capped exponential backoff when it fails, and keeps the state /health reports. The Card also
owns the tokenizer service the runner calls back. A file lock under instance/ keeps a second process off
the same card.

A job tells its requester what happens through typed events: Started, then Text pieces, then Done, or
Failed at any point.
"""
import collections
import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.runner.command import check_installation, choose_program, prepare_workdir, runner_env
from app.runner.driver import GenerationResult, Runner
from app.runner.errors import CardBusy, CardDead, CardUnavailable, QueueFull, RunnerError
from app.runner.tokenizer_service import TokenizerService
from app.runner import protocol

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
UNAVAILABLE_AFTER_CRASHES = 3


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

    @classmethod
    def from_settings(cls, settings, instance_path):
        runner = settings["runner"]
        return cls(model_dir=Path(settings["model"]["dir"]), workdir=Path(instance_path) / "runner",
                   lock_path=Path(instance_path) / "card.lock", binary=runner["binary"],
                   sampling=settings["sampling"], emulator=runner["emulator"],
                   startup_timeout=runner["startup_timeout"], stall_timeout=runner["stall_timeout"],
                   backoff_initial=runner["backoff_initial"], backoff_max=runner["backoff_max"],
                   max_queue=settings["server"]["max_queue"])


class Job:
    """One generation request: the card thread feeds its events, the request thread reads them."""

    def __init__(self, prompt_ids, max_tokens=None, stop=()):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.stop = list(stop or ())
        self.enqueued_at = time.monotonic()
        self.started_at = None
        self._events = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waiting_in = None  # the JobQueue holding it until the card takes it

    # request thread
    def cancel(self):
        """Give up: a waiting job leaves the line at once; a running one is interrupted."""
        self._cancelled.set()
        if self._waiting_in is not None:
            self._waiting_in.remove(self)

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
    """First come, first served, and a job that gives up leaves the line at once (its place is free)."""

    def __init__(self):
        self._jobs = collections.deque()
        self._changed = threading.Condition()
        self.closed = False

    def __len__(self):
        return len(self._jobs)

    def put(self, job, limit=None):
        with self._changed:
            if limit is not None and len(self._jobs) >= limit:
                return False
            job._waiting_in = self
            self._jobs.append(job)
            self._changed.notify()
            return True

    def get(self, timeout):
        """The next job, or None after `timeout` seconds or once closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._jobs or self.closed, timeout)
            if not self._jobs or self.closed:
                return None
            job = self._jobs.popleft()
            job._waiting_in = None
            return job

    def remove(self, job):
        with self._changed:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass  # the card took it first
            job._waiting_in = None

    def close(self):
        """Stop handing out jobs; returns the ones still waiting."""
        with self._changed:
            self.closed = True
            jobs = list(self._jobs)
            self._jobs.clear()
            self._changed.notify_all()
            return jobs

    def drain(self):
        with self._changed:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs


class Card:
    """The runner's supervisor. `submit()` from any thread; everything else happens on the card thread."""

    def __init__(self, tokenizer, options):
        self.tokenizer = tokenizer
        self.options = options
        self.service = TokenizerService(tokenizer)
        self.program = choose_program(options.binary, options.model_dir)

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

    def submit(self, prompt_ids, max_tokens=None, stop=()):
        """Queue a generation; raises CardUnavailable at once when the card cannot take it."""
        if self._stopping.is_set() or self.state == "stopped":
            raise CardUnavailable("the service is shutting down")
        if self.state == "unavailable":
            raise CardUnavailable(self.reason or "the card is unavailable", self._retry_after())
        job = Job(prompt_ids, max_tokens, stop)
        if not self._queue.put(job, self.options.max_queue):
            raise QueueFull(f"{len(self._queue)} requests are already waiting for the card", 5)
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
                    log.exception("card thread")
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

    def _start_runner(self):
        if self.state != "unavailable":  # while it retries, a failed card answers 503 at once
            self.state = "loading"
        self.progress = (0, protocol.LOAD_STEPS)
        try:
            self._take_lock()
            options = self.options
            if not self.program.emulated:
                check_installation(self.program, options.model_dir)
            prepare_workdir(options.workdir, options.sampling)
            command = self.program.argv_prefix + protocol.vendor_flags(options.model_dir, self.service.url)
            env = runner_env(self.program, options.emulator, self.tokenizer.folder)
            log.info("starting the runner: %s", self.program.description)
            self.runner = Runner(command, self.service, options.workdir, env=env,
                                 startup_timeout=options.startup_timeout, stall_timeout=options.stall_timeout,
                                 on_progress=self._on_progress, abort=self._stopping.is_set)
        except RunnerError as exc:
            self._failed(exc, unavailable=True)
            return False
        log.info("runner ready (pid %s, %s)", self.runner.pid, self.program.description)
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
        job._put(Started())
        self.busy = True
        try:
            result = self.runner.generate(job.prompt_ids, max_tokens=job.max_tokens, stop=job.stop,
                                          on_text=lambda text: job._put(Text(text)),
                                          cancelled=lambda: job.cancelled or self._stopping.is_set())
        except RunnerError as exc:
            job._put(Failed(exc))
            self._drop_runner()
            self._failed(exc, unavailable=isinstance(exc, CardDead))
        except Exception as exc:  # a bug of ours: the runner's state is unknown, so restart it
            log.exception("generation failed")
            error = internal_error(exc)
            job._put(Failed(error))
            self._drop_runner()
            self._failed(error, unavailable=False)
        else:
            self.failures = 0
            job._put(Done(result))
        finally:
            self.busy = False

    def _check_idle(self):
        try:
            self.runner.check_idle()
        except RunnerError as exc:
            self._drop_runner()
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

    def _drop_runner(self):
        if self.runner is not None:
            self.runner.close()
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
