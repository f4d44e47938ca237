"""diagnostic_msgs entries built directly (diagnostic_updater is not on PyPI), and process memory."""
from __future__ import annotations

import os
import resource

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


def status(name: str, level, message: str, values: dict, hardware_id: str = "omnivision") -> DiagnosticStatus:
    msg = DiagnosticStatus(name=name, level=level, message=message, hardware_id=hardware_id)
    msg.values = [KeyValue(key=key, value=_text(value)) for key, value in values.items()]
    return msg


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    return str(value)


def process_rss_bytes() -> int:
    """Resident memory of this process (peak resident memory where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
