"""The single inference worker: one thread owns the model, requests wait in a bounded queue.

Plain Python (no ROS). The thread first loads the model (so the caller comes up while a large
model or a TensorRT engine is still loading), then runs queued jobs one at a time. A job has a
deadline covering queue and run time and a cancel flag; `Job.should_stop()` is meant to be
checked once per generated token, so cancel and timeout stop generation at the next token.
Deadlines of waiting jobs are enforced by a watchdog thread that sleeps until the next one, so
nobody has to poll. Every ending is reported once, through the job's `on_done` callback.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from typing import Callable, Generic, TypeVar

from omnivision_ros.errors import OmniVisionError

Model = TypeVar("Model")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"
QUEUED, RUNNING, DONE, ERROR, CANCELLED, TIMED_OUT = "queued", "running", "done", "error", "cancelled", "timed_out"


class Job:
    """One request. `work(model, job)` runs on the worker thread; its return value becomes `result`."""

    def __init__(self, work: Callable[[object, "Job"], object], timeout_s: float | None,
                 on_done: Callable[["Job"], None] | None = None):
        self.work = work
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.on_done = on_done
        self.submitted = time.monotonic()
        self.deadline = self.submitted + self.timeout_s if self.timeout_s else None
        self.started: float | None = None
        self.finished: float | None = None
        self.state = QUEUED
        self.result: object = None
        self.error = ""
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def should_stop(self) -> bool:
        """True once the job is cancelled or past its deadline: generation should end now."""
        return self._cancel.is_set() or self.expired()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def queue_s(self) -> float:
        """Seconds spent waiting in the queue (so far, if not started yet)."""
        end = self.started if self.started is not None else (self.finished or time.monotonic())
        return end - self.submitted


def _log_error(message: str) -> None:
    logging.getLogger(__name__).error(message)


class InferenceWorker(Generic[Model]):
    """Loads a model with `load()` on its own thread, then runs submitted jobs one at a time.

    At most `queue_size` jobs wait behind the running one; `submit` refuses more with an
    OmniVisionError saying so. After a failed load every submit raises with the load error.
    A running job that ignores its deadline for `grace_s` more seconds is reported as timed out
    (the model keeps the thread until it returns). `log` receives unexpected failures with
    their traceback (the node passes its ROS logger).
    """

    def __init__(self, load: Callable[[], Model], queue_size: int, name: str = "omnivision-worker",
                 on_loaded: Callable[["InferenceWorker"], None] | None = None,
                 log: Callable[[str], None] = _log_error, grace_s: float = 10.0):
        if queue_size < 1:
            raise OmniVisionError(f"queue_size must be at least 1, got {queue_size}")
        self.queue_size = queue_size
        self.state = LOADING
        self.load_error = ""
        self.load_s = 0.0
        self.model: Model | None = None
        self.running: Job | None = None
        self.grace_s = grace_s
        self._load = load
        self._on_loaded = on_loaded
        self._log = log
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-deadlines", daemon=True)

    def start(self) -> "InferenceWorker[Model]":
        self._thread.start()
        self._watchdog.start()
        return self

    @property
    def depth(self) -> int:
        """Jobs waiting (the running one not counted)."""
        with self._cond:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Model loaded, nothing running and nothing waiting."""
        with self._cond:
            return self.state == READY and self.running is None and not self._waiting

    @property
    def loading_s(self) -> float:
        return time.monotonic() - self._started_at if self.state == LOADING else self.load_s

    def submit(self, work: Callable[[Model, Job], object], timeout_s: float | None = None,
               on_done: Callable[[Job], None] | None = None, only_if_idle: bool = False) -> Job:
        """Queue `work`; OmniVisionError when it cannot be accepted. `only_if_idle` is for
        low-priority work (periodic jobs): it is refused unless the model is loaded and has
        nothing running or waiting, so it never delays a request by more than its own run."""
        with self._cond:
            if self.state == FAILED:
                raise OmniVisionError(f"the model is not loaded: {self.load_error}")
            if self.state == STOPPED:
                raise OmniVisionError("the node is shutting down")
            if only_if_idle and (self.state != READY or self.running is not None or self._waiting):
                raise OmniVisionError("the model is busy")
            if len(self._waiting) >= self.queue_size:
                raise OmniVisionError(
                    f"queue full ({len(self._waiting)} waiting); retry later or raise the queue_size parameter")
            job = Job(work, timeout_s, on_done)
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a job: a waiting one ends now, a running one at its next should_stop() check."""
        job.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
            else:
                return
        self._finish(job, CANCELLED, "canceled before it started")

    def wait(self, job: Job, timeout_s: float | None = None) -> Job:
        """Block until the job ends (or `timeout_s` passes) and return it."""
        job.wait(timeout_s)
        return job

    def stop(self, timeout_s: float = 5.0) -> None:
        """Refuse new jobs, end waiting ones, stop the running one at its next token, join the thread."""
        with self._cond:
            previous, self.state = self.state, STOPPED
            waiting = list(self._waiting)
            self._waiting.clear()
            running = self.running
            self._cond.notify_all()
        for job in waiting:
            job.cancel()
            self._finish(job, CANCELLED, "the node is shutting down")
        if running is not None:
            running.cancel()
        if self._thread.is_alive() and previous != FAILED:
            self._thread.join(timeout_s)

    # --- worker thread ---------------------------------------------------------------------

    def _queue_timeout_reason(self, job: Job) -> str:
        why = " while the model was loading" if self.state == LOADING else ""
        return (f"timed out after {job.timeout_s:g} s (request_timeout_s) waiting in the queue{why}; "
                "the node is busy, retry later")

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            model = self._load()
        except Exception as exc:  # any load failure leaves the node up, reporting it
            reason = str(exc) if isinstance(exc, OmniVisionError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, OmniVisionError):
                self._log(f"model load failed:\n{traceback.format_exc()}")
            self._fail_load(reason, time.monotonic() - t0)
            return
        with self._cond:
            self.load_s = time.monotonic() - t0
            self.model = model
            if self.state == STOPPED:
                return
            self.state = READY
            self._cond.notify_all()
        if self._on_loaded is not None:
            self._on_loaded(self)
        while True:
            with self._cond:
                while not self._waiting and self.state != STOPPED:
                    self._cond.wait()
                if self.state == STOPPED:
                    return
                job = self._waiting.popleft()
                self.running = job
            try:
                self._execute(model, job)
            finally:
                with self._cond:
                    self.running = None
                    self._cond.notify_all()

    def _fail_load(self, reason: str, load_s: float) -> None:
        with self._cond:
            self.load_s = load_s
            self.load_error = reason
            if self.state != STOPPED:
                self.state = FAILED
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, ERROR, f"the model is not loaded: {reason}")
        if self._on_loaded is not None:
            self._on_loaded(self)

    def _execute(self, model: Model, job: Job) -> None:
        if job.cancel_requested:
            self._finish(job, CANCELLED, "canceled before it started")
            return
        if job.expired():
            self._finish(job, TIMED_OUT, self._queue_timeout_reason(job))
            return
        job.started = time.monotonic()
        job.state = RUNNING
        try:
            job.result = job.work(model, job)
        except OmniVisionError as exc:
            self._finish(job, ERROR, str(exc))
            return
        except Exception as exc:  # a bug must not kill the worker: report it and keep serving
            self._log(f"inference failed:\n{traceback.format_exc()}")
            self._finish(job, ERROR, f"internal error: {type(exc).__name__}: {exc}")
            return
        if job.cancel_requested:
            self._finish(job, CANCELLED, "the node is shutting down" if self.state == STOPPED else "canceled")
        elif job.expired():
            self._finish(job, TIMED_OUT, f"timed out after {job.timeout_s:g} s (request_timeout_s); "
                                         "generation was stopped, ask for fewer tokens or raise the timeout")
        else:
            self._finish(job, DONE, "")

    def _watch(self) -> None:
        """Deadline watchdog: ends waiting jobs at their deadline (the worker may be busy with a long
        job or still loading) and reports a running job that overran its deadline by grace_s."""
        while True:
            expired, stuck = [], None
            with self._cond:
                if self.state in (STOPPED, FAILED):
                    return
                now = time.monotonic()
                expired = [job for job in self._waiting if job.expired(now)]
                for job in expired:
                    self._waiting.remove(job)
                running = self.running
                if running is not None and running.deadline is not None and not running.done \
                        and now >= running.deadline + self.grace_s:
                    stuck = running
                deadlines = [job.deadline for job in self._waiting if job.deadline is not None]
                if running is not None and running.deadline is not None and not running.done:
                    deadlines.append(running.deadline + (self.grace_s if now >= running.deadline else 0.0))
                if not expired and stuck is None:
                    self._cond.wait(max(min(deadlines) - now, 0.001) if deadlines else None)
                    continue
            for job in expired:
                self._finish(job, TIMED_OUT, self._queue_timeout_reason(job))
            if stuck is not None:
                self._finish(stuck, TIMED_OUT, f"timed out after {stuck.timeout_s:g} s (request_timeout_s); "
                                               "the model did not stop in time")

    def _finish(self, job: Job, state: str, error: str) -> None:
        with self._cond:
            if job.done:
                return  # the first ending wins (e.g. expired by the watchdog, then finished by the worker)
            job.state = state
            job.error = error
            job.finished = time.monotonic()
            job._done.set()
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:
                self._log(f"job completion callback failed:\n{traceback.format_exc()}")
