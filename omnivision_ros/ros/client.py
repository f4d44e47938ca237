"""A small client side of the node for the demo and the tests: a node spinning in the background
on its own rclpy context, blocking calls with deadlines, and camera message builders."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from sensor_msgs.msg import CompressedImage, Image


class BackgroundNode:
    """An rclpy node on a private context, spun by a MultiThreadedExecutor on a daemon thread."""

    def __init__(self, name: str, args: list[str] | None = None):
        self.context = Context()
        rclpy.init(args=args, context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name=f"{name}-spin", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def now(self) -> Time:
        return self.node.get_clock().now().to_msg()

    def wait_future(self, future, timeout_s: float, what: str):
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
        return future.result()

    def call(self, client, request, timeout_s: float = 30.0):
        """Call a service and return its response; TimeoutError when the service or the answer is late."""
        deadline = time.monotonic() + timeout_s
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"service {client.srv_name} not available within {timeout_s:g} s")
        return self.wait_future(client.call_async(request), max(deadline - time.monotonic(), 0.1), client.srv_name)

    def action_client(self, action_type, name: str) -> ActionClient:
        return ActionClient(self.node, action_type, name)

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.02):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll_s)
        raise TimeoutError(f"{what}: not within {timeout_s:g} s")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=2.0)


def stamp(seconds: float) -> Time:
    sec = int(seconds)
    return Time(sec=sec, nanosec=int(round((seconds - sec) * 1e9)) % 1_000_000_000)


def image_msg(bgr: np.ndarray, stamp_msg: Time, frame_id: str, encoding: str = "bgr8") -> Image:
    """A sensor_msgs/Image of a BGR uint8 picture in `encoding` (bgr8, rgb8 or mono8)."""
    if encoding == "rgb8":
        pixels = bgr[:, :, ::-1]
    elif encoding == "mono8":
        pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    elif encoding == "bgr8":
        pixels = bgr
    else:
        raise ValueError(f"image_msg: no conversion to {encoding}")
    pixels = np.ascontiguousarray(pixels)
    msg = Image(encoding=encoding, height=pixels.shape[0], width=pixels.shape[1],
                step=pixels.shape[1] * (1 if pixels.ndim == 2 else pixels.shape[2]), is_bigendian=0)
    msg.header.stamp = stamp_msg
    msg.header.frame_id = frame_id
    msg.data = pixels.tobytes()
    return msg


def compressed_msg(bgr: np.ndarray, stamp_msg: Time, frame_id: str, fmt: str = "jpeg") -> CompressedImage:
    ok, encoded = cv2.imencode(".jpg" if fmt == "jpeg" else f".{fmt}", bgr)
    if not ok:
        raise ValueError(f"compressed_msg: cannot encode as {fmt}")
    msg = CompressedImage(format=fmt)
    msg.header.stamp = stamp_msg
    msg.header.frame_id = frame_id
    msg.data = encoded.tobytes()
    return msg
