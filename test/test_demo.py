"""`make demo`'s program (omnivision-demo) end to end as the README runs it, on the session's tiny
bundle: node subprocess, camera publisher, Ask twice, Describe and Check, clean SIGINT exit."""
from __future__ import annotations

import re
import subprocess
import sys


def test_demo_asks_describes_checks_and_stops_cleanly(tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "omnivision_ros.demo", "--model", str(tiny_bundle),
                             "--max-new-tokens", "6"], capture_output=True, text=True, timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert re.search(r"\[demo\] ask 'Is the door open\?' -> '.+' \((length|stop)\)", out), out[-4000:]
    second = out.split("ask again, same frame", 1)[1]
    assert "vision cache hit, prefix cache hit" in second.split("[demo] describe", 1)[0]
    check = re.search(r"\[demo\] check 'Is the door open\?' -> (yes|no), p_yes ([0-9.]+), yes/no mass ([0-9.e+-]+)", out)
    assert check, out[-4000:]
    assert 0.0 <= float(check.group(2)) <= 1.0 and 0.0 < float(check.group(3)) <= 1.0
    assert "no decoding | vision cache hit, prefix cache hit" in out
    assert "[demo] node exited with code 0" in out
