"""What is asked of the card, and how its answer comes back: a GenerationSpec, the Job that runs it, and the
line of jobs waiting for the card.

A job tells its requester what happens through typed events: Started, then Text pieces, then Done, or Failed at
any point; Requeued when it must run again from the start (preempted by a person, or its runner failed under
it before its client saw text), and then Started again.
"""
import collections
import queue
import threading
from dataclasses import dataclass

from app.runner.driver import GenerationResult
from app.runner.errors import CardUnavailable, QueueFull

INTERACTIVE, BACKGROUND = "interactive", "background"  # the two classes of requests (app/scheduling.py)


@dataclass(frozen=True)
class GenerationSpec:
    """One generation as the card runs it: the prompt ids, the output limit (None: the window decides), the stop
    strings, further cutters (factories: each run gets fresh ones; runner/cutters.py), whose it is and whether
    its text goes to its client as it comes."""
    prompt_ids: tuple
    max_tokens: int | None = None
    stop_strings: tuple = ()
    cutters: tuple = ()
    request_class: str = INTERACTIVE
    streamed: bool = False


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
    """The job waits again, at the head of its class, and runs again from the start: it was preempted by a
    person's request, or the runner failed under it, before its client saw any text."""


@dataclass(frozen=True)
class Failed:
    """The job failed: a RunnerError, or CardUnavailable when it never ran."""
    error: Exception


class Job:
    """One generation request: the card thread feeds its events, the request thread reads them."""

    def __init__(self, spec):
        self.spec = spec
        self.retried = False          # card thread: it ran again once already, after the runner failed under it
        self.started_at = None        # card thread: when its (latest) run started...
        self.finished_at = None       # ...and ended, whatever the outcome
        self.text_sent = False        # card thread: some text went to the requester in this run
        self._events = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waiting_in = None  # the JobQueue holding it until the card takes it

    @property
    def request_class(self):
        return self.spec.request_class

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
        """Started | Text | Done | Requeued | Failed; None when `timeout` passes."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    # card thread
    def put(self, event):
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

    def depth(self, request_class):
        return len(self._lines[request_class])

    def depths(self):
        return {request_class: len(line) for request_class, line in self._lines.items()}

    def put(self, job, limit=None):
        """Queue a job. When `limit` jobs already wait, an interactive job takes the place of the newest
        background one (returned, for its requester to be told), and anything else raises QueueFull: a
        person is never turned away for background work."""
        with self._changed:
            if self.closed:
                raise CardUnavailable("the service is shutting down")
            evicted = None
            if limit is not None and len(self) >= limit:
                if job.request_class == BACKGROUND or not self._lines[BACKGROUND]:
                    raise QueueFull(f"{len(self)} requests are already waiting for the card", 5)
                evicted = self._lines[BACKGROUND].pop()
                evicted._waiting_in = None
            job._waiting_in = self
            self._lines[job.request_class].append(job)
            self._changed.notify()
            return evicted

    def requeue(self, job):
        """Put a job back at the head of its class: it keeps its place (unless it gave up meanwhile:
        Job.cancel() found it in no line, so it must not stay in one)."""
        with self._changed:
            job._waiting_in = self
            self._lines[job.request_class].appendleft(job)
            self._changed.notify()
        # After it is in line: a cancel() that came before saw no line to leave, one after finds this one.
        if job.cancelled:
            self.remove(job)

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
            if job.request_class == INTERACTIVE:
                return interactive.index(job) if job in interactive else None
            return len(interactive) + background.index(job) if job in background else None

    def remove(self, job):
        with self._changed:
            try:
                self._lines[job.request_class].remove(job)
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
