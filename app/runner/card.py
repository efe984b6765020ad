"""One card, one driver: the thread that owns the runner and serves generations, people first.

The card-facing side of the service is this one small interface: `start()`; `submit(spec)`, which turns a
GenerationSpec into a Job whose events say what happens (jobs.py); the job's `cancel()`, which interrupts it;
`state` and the figures /health and /metrics read. Another runner (a newer build of the vendor's, say) could be
driven behind the same interface: only driver.py and command.py know main_axcl.

A single long-lived thread spawns the runner (so PR_SET_PDEATHSIG, which fires when the *thread* that
forked exits, means "when this worker dies"), takes jobs one at a time, restarts the runner with capped
exponential backoff when it fails, and keeps the state /health reports. The Card also owns the tokenizer
service the runner calls back. A file lock under instance/ keeps a second process off the same card.

People go before background work (titles, tags, follow-up suggestions...): the queue serves interactive
jobs first, and a background generation whose client has seen no text yet is interrupted when a person's
request arrives, then run again from the start. A job the runner fails under before its client saw text runs
again too, once, on the new runner.
"""
import enum
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.runner import emulated_model, protocol
from app.runner.command import (check_embedding_writable, check_installation, choose_program, prepare_workdir,
                                runner_env)
from app.runner.driver import Runner
from app.runner.errors import (CardBusy, CardDead, CardUnavailable, QueueFull, RunnerError, RunnerStalled,
                               RunnerStartError)
from app.runner.jobs import BACKGROUND, INTERACTIVE, Done, Failed, Job, JobQueue, Requeued, Started, Text
from app.runner.pace import PromptPace
from app.runner.tokenizer_service import TokenizerService
from app.text import traceback_without_message

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0
CARD_SECONDS_PER_TOKEN = 1 / 14  # the LLM-8850's pace on a Raspberry Pi 5, prompt and output alike
PROBE_TIMEOUT_SECONDS = 5.0  # an idle runner prints its prompt within milliseconds of an empty line
UNAVAILABLE_AFTER_CRASHES = 3


class CardState(str, enum.Enum):
    """Where the card stands, as /health, /metrics and Ollama's /api/ps say it."""
    STARTING = "starting"
    LOADING = "loading"          # the runner loads the model (or restarts)
    READY = "ready"              # at its prompt
    UNAVAILABLE = "unavailable"  # it failed to start, or failed too often: requests get 503 at once
    STOPPED = "stopped"


def internal_error(exc):
    """A bug of ours as a RunnerError. Its type only: an exception's message may quote a prompt, and this
    one reaches /health and other clients (the log line carries the traceback)."""
    return RunnerError(f"internal error ({type(exc).__name__})")


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
        self._state = CardState.STARTING
        self.loading = (0, protocol.LOAD_STEPS)  # the runner's loading steps done, of all
        self._window = protocol.MAX_TOKEN_LEN
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
        if self.state == CardState.UNAVAILABLE:
            return "unavailable"
        return "emulated" if self.emulated else "available"

    @property
    def window(self):
        """The window the runner reported in its banner (the model's before it first started)."""
        return self._window

    @property
    def queue_depth(self):
        return len(self._queue)

    def queue_depths(self):
        return self._queue.depths()

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
            job.put(Failed(CardUnavailable("the service is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
        self.service.stop()

    def submit(self, spec):
        """Queue a generation (a GenerationSpec); raises CardUnavailable (QueueFull) at once when the card cannot
        take it."""
        if self._stopping.is_set() or self.state == CardState.STOPPED:
            raise CardUnavailable("the service is shutting down")
        if self.state == CardState.UNAVAILABLE:
            raise CardUnavailable(self.reason or "the card is unavailable", self._retry_after())
        job = Job(spec)
        evicted = self._queue.put(job, self.options.max_queue)
        if evicted is not None:
            evicted.put(Failed(QueueFull("a person's request took the place of this background request", 5)))
        return job

    def wait_ready(self, timeout):
        """For tests and start-up scripts: wait until the runner is at its prompt (or the card gave up)."""
        with self._state_changed:
            self._state_changed.wait_for(lambda: self._state in (CardState.READY, CardState.UNAVAILABLE), timeout)
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
        if self.state != CardState.UNAVAILABLE:  # while it retries, a failed card answers 503 at once
            self.state = CardState.LOADING
        self.loading = (0, protocol.LOAD_STEPS)
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
                                 on_loading=self._on_loading, abort=self._stopping.is_set)
        except OSError as exc:  # the runner's files: its working folder, the emulator's model folder
            self._failed(RunnerStartError(f"cannot prepare the runner's files: {exc.strerror or exc} "
                                          f"({exc.filename})"), unavailable=True)
            return False
        except RunnerError as exc:
            self._failed(exc, unavailable=True)
            return False
        log.info("runner ready (pid %s, %s)", self.runner.pid, self.program.description)
        if self.runner.window != self._window:
            log.warning("the runner's window is %d tokens, not %d", self.runner.window, self._window)
            self._window = self.runner.window
        self._last_active = time.monotonic()
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        self.state = CardState.READY
        self.reason = None
        self.retry_at = None
        return True

    def _on_loading(self, step, total):
        self.loading = (step, total)

    def _serve(self, job):
        spec = job.spec
        job.started_at = time.monotonic()
        job.text_sent = False
        job.put(Started())
        self.busy = True
        preempted = False

        def on_text(text):
            job.text_sent = True
            job.put(Text(text))

        def should_stop():
            nonlocal preempted
            if job.cancelled or self._stopping.is_set():
                return True
            # A person waits, and this background job's client has seen nothing yet: it can run again later.
            if (self.options.preempt and spec.request_class == BACKGROUND and not self._client_saw_text(job)
                    and self._queue.depth(INTERACTIVE)):
                preempted = True
            return preempted

        try:
            result = self.runner.generate(spec.prompt_ids, max_tokens=spec.max_tokens, stop=spec.stop_strings,
                                          on_text=on_text, cancelled=should_stop,
                                          cutters=[make() for make in spec.cutters])
        except RunnerError as exc:
            self._failed_under(job, exc)
        except Exception as exc:  # a bug of ours: the runner's state is unknown, so restart it
            log.error("generation failed: %s", traceback_without_message(exc))
            error = internal_error(exc)
            job.put(Failed(error))
            self._drop_runner()
            self._failed(error, unavailable=False)
        else:
            self.failures = 0
            self._pace.observe(result)
            if preempted and result.finish_reason == "cancelled" and not job.cancelled:
                self.preemptions += 1
                log.info("a background generation gave way to a person's request; it will run again")
                self._run_again(job)
            else:
                job.put(Done(result))
        finally:
            job.finished_at = time.monotonic()
            self.busy = False

    @staticmethod
    def _client_saw_text(job):
        return job.spec.streamed and job.text_sent

    def _failed_under(self, job, exc):
        """The runner failed under a job: the job runs again once if its client has seen nothing, else its
        client is told at once (before the runner is closed, which can take seconds); then the runner goes."""
        self._failed(exc, unavailable=isinstance(exc, CardDead))
        if job.retried or job.cancelled or self._client_saw_text(job) or self.state == CardState.UNAVAILABLE:
            job.put(Failed(exc))
        else:
            job.retried = True
            self.retries += 1
            log.info("a generation the runner failed under will run again once the runner is back")
            self._run_again(job)
        self._drop_runner(force=isinstance(exc, RunnerStalled))

    def _run_again(self, job):
        job.put(Requeued())
        self._queue.requeue(job)

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
            self.state = CardState.UNAVAILABLE
        elif self.state != CardState.UNAVAILABLE:
            self.state = CardState.LOADING  # restarting
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
            job.put(Failed(CardUnavailable(reason or self.reason or "the card is unavailable",
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
        self.state = CardState.STOPPED
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
