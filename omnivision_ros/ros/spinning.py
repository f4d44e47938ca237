"""Running a node on one executor thread: calls from other threads onto that thread, and a main
thread that waits for Ctrl-C / SIGTERM, so requests in flight can still be answered over ROS
before the context shuts down."""
from __future__ import annotations

import collections
import os
import signal
import threading

import rclpy
from rclpy.executors import ExternalShutdownException


class CallSoon:
    """`calls(function, *args)` runs function(*args) on the executor thread; callable from any thread.

    One guard condition wakes the executor; each wake runs the calls queued before it, in order.
    """

    def __init__(self, node, callback_group=None):
        self._node = node
        self._calls: collections.deque = collections.deque()
        self._closed = False
        self._guard = node.create_guard_condition(self._run, callback_group)

    def __call__(self, function, *args) -> None:
        if not self._closed:
            self._calls.append((function, args))
            self._guard.trigger()

    def _run(self) -> None:
        # Only the calls queued so far: one queued from here runs on the executor's next pass.
        for _ in range(len(self._calls)):
            function, args = self._calls.popleft()
            try:
                function(*args)
            except Exception as exc:  # e.g. feedback of a goal that has just ended: keep serving
                self._node.get_logger().error(f"{getattr(function, '__name__', function)} failed: {exc!r}")

    def flush(self, timeout_s: float, passes: int = 4) -> bool:
        """Wait until the executor has made `passes` more passes (each resumes the coroutines the
        previous one woke: replies, then the responses and goal results they send), then stop
        taking calls. False when the executor did not get there within `timeout_s`."""
        done = threading.Event()

        def step(left: int) -> None:
            if left:
                self(step, left - 1)
            else:
                done.set()

        self(step, passes)
        flushed = done.wait(timeout_s) if timeout_s > 0 else False
        self._closed = True
        return flushed


def init_ros(args=None) -> None:
    """rclpy.init without rclpy's signal handlers: Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt
    in the main thread (see Spinner), which ends the requests in flight, then shuts down."""
    # Both explicitly: a process started in the background of a shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from rclpy.signals import SignalHandlerOptions

        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # an rclpy without the option: its handler shuts the context down
        rclpy.init(args=args)


class Spinner:
    """Spins `executor` on its own thread while the main thread waits in `wait()`."""

    def __init__(self, executor):
        self.executor = executor
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._thread = threading.Thread(target=self._spin, name="omnivision-executor", daemon=True)

    @property
    def spinning(self) -> bool:
        return self._thread.is_alive()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        finally:
            os.write(self._wake_write, b"\0")  # wait() returns

    def wait(self) -> None:
        """Start spinning; return when the executor stops, raise KeyboardInterrupt on SIGINT/SIGTERM.

        A signal may land on any thread of the process (DDS, inference); Python then writes to its
        wakeup fd, which ends the read here (a join or a lock wait would sleep through it)."""
        signal.set_wakeup_fd(self._wake_write)
        self._thread.start()
        os.read(self._wake_read, 1)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.executor.shutdown(timeout_sec=timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout_s)  # entities must not be destroyed under a running wait
        signal.set_wakeup_fd(-1)
