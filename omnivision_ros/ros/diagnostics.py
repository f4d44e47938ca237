"""The node's /diagnostics entries, built directly (diagnostic_updater is not on PyPI): the model,
the request queue, one entry per camera and one per standing watch; plus process memory."""
from __future__ import annotations

import os
import resource

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from omnivision_ros.ros.frames import CameraFeed
from omnivision_ros.worker import LOADING, READY

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def status(name: str, level, message: str, values: dict, hardware_id: str = "omnivision") -> DiagnosticStatus:
    msg = DiagnosticStatus(name=name, level=level, message=message, hardware_id=hardware_id)
    msg.values = [KeyValue(key=key, value=_text(value)) for key, value in values.items()]
    return msg


def _text(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value != 0 and abs(value) < 1e-3:  # e.g. a yes/no mass of 5e-05 is not 0
            return f"{value:.3g}"
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def process_rss_bytes() -> int:
    """Resident memory of this process (peak resident memory where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(node_name: str, orchestrator, stamp, now_ns: int, watches: list[dict] = ()) -> DiagnosticArray:
    """The DiagnosticArray of one node: `orchestrator` is its omnivision_ros.orchestration.Orchestrator,
    `stamp` a builtin_interfaces/Time, `now_ns` the same time in nanoseconds (frame ages), `watches` its
    omnivision_ros.watches.Watches.snapshot()."""
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [model_status(node_name, orchestrator), request_status(node_name, orchestrator)]
    array.status += [camera_status(node_name, feed, now_ns, orchestrator.config.max_frame_age_s)
                     for feed in orchestrator.feeds.values()]
    array.status += [watch_status(node_name, watch) for watch in watches]
    return array


def model_status(node_name: str, orchestrator) -> DiagnosticStatus:
    cfg, worker = orchestrator.config, orchestrator.worker
    backend = orchestrator.backend_name
    values = {"model": cfg.model, "backend_requested": cfg.backend, "backend": backend or "-",
              "backend_description": orchestrator.backend_description or "-", "state": worker.state,
              "load_time_s": round(worker.loading_s, 2)}
    name = f"{node_name}: model"
    if worker.state == READY:
        return status(name, OK, f"ready on {backend}", values)
    if worker.state == LOADING:
        return status(name, WARN, f"loading ({worker.loading_s:.0f} s)", values)
    values["error"] = worker.load_error or "-"
    return status(name, ERROR, f"model not loaded: {worker.load_error or worker.state}", values)


def request_status(node_name: str, orchestrator) -> DiagnosticStatus:
    cfg, worker, stats = orchestrator.config, orchestrator.worker, orchestrator.stats
    depth = worker.depth
    values = {"queue_depth": depth, "queue_size": cfg.queue_size, "busy": worker.running is not None,
              "served": stats.served, "failed": stats.failed, "last_ttft_ms": round(stats.last_ttft_ms, 1),
              "last_tokens_per_second": round(stats.last_tokens_per_second, 1),
              "rss_mb": round(process_rss_bytes() / 2**20, 1)}
    name = f"{node_name}: requests"
    if depth >= cfg.queue_size:
        return status(name, WARN, f"queue full ({depth} waiting)", values)
    return status(name, OK, f"{depth} waiting", values)


def camera_status(node_name: str, feed: CameraFeed, now_ns: int, max_age_s: float) -> DiagnosticStatus:
    frame = feed.latest()
    values = {"topic": feed.topic, "transport": feed.transport, "frames_received": feed.count,
              "rate_hz": round(feed.rate_hz(), 2)}
    name = f"{node_name}: camera {feed.name}"
    if frame is None:
        return status(name, WARN, "no frame received yet", values)
    age = frame.age_s(now_ns)
    values["frame_age_s"] = round(age, 3)
    if max_age_s >= 0 and age > max_age_s:
        return status(name, WARN, f"stale: newest frame {age:.1f} s old", values)
    return status(name, OK, f"{values['rate_hz']:g} Hz", values)


def watch_status(node_name: str, watch: dict) -> DiagnosticStatus:
    """One standing watch: its definition, state, last probability and counters (skipped_busy: cycles lost
    to requests)."""
    name = f"{node_name}: watch {watch['name']}"
    values = {key: value for key, value in watch.items() if key != "name"}
    if watch["evaluations"] == 0:
        why = f"; last error: {watch['last_error']}" if watch["failures"] else ""
        return status(name, WARN if watch["failures"] else OK, f"no evaluation yet{why}", values)
    message = f"{'true' if watch['state'] else 'false'} (p_yes {watch['last_probability']:.3f})"
    if watch["last_error"] != "-":
        return status(name, WARN, f"{message}; last error: {watch['last_error']}", values)
    return status(name, OK, message, values)
