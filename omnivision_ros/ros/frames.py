"""The newest frame of each camera, with the receive statistics the diagnostics report. No rclpy."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

RATE_WINDOW_S = 5.0
TRANSPORTS = ("raw", "compressed")  # sensor_msgs/Image, sensor_msgs/CompressedImage


@dataclass(frozen=True)
class Frame:
    msg: object  # sensor_msgs Image or CompressedImage, not decoded yet
    camera: str
    seq: int  # per-camera receive counter
    received_ns: int  # node clock at arrival (nanoseconds), for frames stamped 0

    @property
    def stamp_ns(self) -> int:
        stamp = self.msg.header.stamp
        return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)

    @property
    def key(self) -> tuple:
        """Identity of the frame for the model's caches: (camera, stamp), or the receive counter
        when the camera does not stamp its frames."""
        stamp = self.stamp_ns
        return (self.camera, "stamp", stamp) if stamp else (self.camera, "seq", self.seq)

    def age_s(self, now_ns: int) -> float:
        """Seconds since the frame's stamp (since arrival for frames stamped 0), on the node clock."""
        return (now_ns - (self.stamp_ns or self.received_ns)) / 1e9


class CameraFeed:
    """Keeps only the newest message of one camera; thread-safe (the callback stores, requests read)."""

    def __init__(self, name: str, topic: str, transport: str):
        self.name = name
        self.topic = topic
        self.transport = transport
        self.count = 0
        self._latest: Frame | None = None
        self._arrivals: collections.deque[float] = collections.deque(maxlen=256)
        self._lock = threading.Lock()

    def store(self, msg, now_ns: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            self._latest = Frame(msg, self.name, self.count, now_ns)
            self._arrivals.append(now)

    def latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    def rate_hz(self) -> float:
        """Frames per second over the last RATE_WINDOW_S seconds (0 when fewer than two arrived)."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._arrivals if now - t <= RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)
