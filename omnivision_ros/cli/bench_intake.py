"""omnivision-bench-intake: how many camera frames omnivision_node receives, and at what CPU cost.

For each case (DDS setting x frame size x transport) and each run: a fresh omnivision_node process
with N cameras, then N publisher processes (one per camera, like N camera drivers) sending W x H
frames at R Hz for S seconds. Reported per case, as medians over the runs:

- frames published (all cameras) and the share the node received, by its own `frames_received`
  counters on /diagnostics;
- the node's CPU use while receiving, in % of one core, from /proc/<pid>/stat (no request runs).

DDS settings: `default` (ROS 2 defaults), `large_data` (config/fastdds_large_data.xml on every
process), `shm` (config/fastdds_shm.xml on every process, the variant for Humble), and
`large_data_node_only` (the profile on the node alone: what happens when the camera driver is
not configured). Every process runs with ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET (the ROS 2
default; LOCALHOST would replace the transports) on one ROS_DOMAIN_ID of its own.

    omnivision-bench-intake                          # the table of docs/node.md
    omnivision-bench-intake --cameras 2 --sizes 640x480 --rates 30 --dds large_data --transports raw
    omnivision-bench-intake --node-python ../old/.venv/bin/python --node-cwd ../old   # another checkout's node

The load average is printed at the start and the end: on a shared machine it moves every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.ros.dds import PROFILE_VARIABLES, profile_environment, profiles_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = PACKAGE_DIR / "data" / "sample.jpg"
NAMESPACE = "/bench"
NODE = f"{NAMESPACE}/omnivision_node"
RESULT_TAG = "INTAKE_RESULT "
# Each camera first streams WARM_UP_S seconds that are not counted (the first frames after discovery
# can be lost while the transports connect), pauses PAUSE_S (the node's counters are read from a
# diagnostics message sent meanwhile), then streams the counted frames.
WARM_UP_S, PAUSE_S = 1.0, 1.6
DDS_SETTINGS = ("default", "large_data", "shm", "large_data_node_only")
_DDS_VARIABLES = (*PROFILE_VARIABLES, "FASTDDS_BUILTIN_TRANSPORTS", "RMW_FASTRTPS_USE_QOS_FROM_XML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-bench-intake", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=2, help="cameras, one publisher process each (default 2)")
    parser.add_argument("--sizes", default="640x480,1280x720", help="frame sizes WxH, comma-separated")
    parser.add_argument("--rates", default="30", help="frame rates in Hz, comma-separated (default 30)")
    parser.add_argument("--transports", default="raw,compressed",
                        help="raw (sensor_msgs/Image bgr8) and/or compressed (CompressedImage JPEG)")
    parser.add_argument("--dds", default="default,large_data", help=f"DDS settings among {', '.join(DDS_SETTINGS)}")
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time per run (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case, a fresh node each (default 3)")
    parser.add_argument("--reliable", action="store_true",
                        help="publishers use reliable QoS (default: best effort, like most camera drivers)")
    parser.add_argument("--model", default="tiny",
                        help="model of the node (default: the tiny preset; no request runs, only loading matters)")
    parser.add_argument("--node-python", default=sys.executable,
                        help="Python that runs the node (another checkout's .venv/bin/python to measure its node)")
    parser.add_argument("--node-cwd", default=None, help="working directory of the node (that checkout)")
    parser.add_argument("--profiles-dir", default=None,
                        help="folder of the Fast DDS profiles (default: this package's config/)")
    parser.add_argument("--json", help="write every run's figures to this file")
    parser.add_argument("--publish", help=argparse.SUPPRESS)  # internal: one camera publisher (JSON spec)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON spec)
    return parser


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise OmniVisionError(f"frame size '{text}' is not WxH (e.g. 640x480)") from None
    if width < 16 or height < 16:
        raise OmniVisionError(f"frame size '{text}' is too small")
    return width, height


def dds_environment(setting: str, directory: Path, domain_id: int) -> tuple[dict, dict]:
    """(environment of the node, environment of the publishers and the observer) for a DDS setting."""
    base = {k: v for k, v in os.environ.items() if k not in _DDS_VARIABLES}
    base.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="SUBNET", PYTHONUNBUFFERED="1")
    if setting == "default":
        return base, base
    with_profile = dict(base, **profile_environment(setting.replace("_node_only", ""), directory))
    return with_profile, (base if setting == "large_data_node_only" else with_profile)


# ---------------------------------------------------------------------------------------------
# One camera: a publisher process


def publish(spec: dict) -> int:
    """Publish spec['count'] frames at spec['rate'] Hz once told to start; print what was sent."""
    import cv2
    import numpy as np
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image

    width, height = spec["size"]
    picture = cv2.resize(cv2.imread(str(SAMPLE_IMAGE)), (width, height), interpolation=cv2.INTER_AREA)
    if spec["transport"] == "compressed":
        msg = CompressedImage(format="jpeg")
        msg.data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    else:
        msg = Image(height=height, width=width, encoding="bgr8", step=width * 3)
        msg.data = np.ascontiguousarray(picture).tobytes()
    msg.header.frame_id = spec["topic"].strip("/").replace("/", "_")
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE) if spec["reliable"] else qos_profile_sensor_data

    rclpy.init()
    node = rclpy.create_node(f"camera_{spec['index']}")
    publisher = node.create_publisher(type(msg), spec["topic"], qos)
    deadline = time.monotonic() + 30.0
    while publisher.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    matched = publisher.get_subscription_count() > 0
    print(json.dumps({"ready": matched}), flush=True)
    start_at = float(sys.stdin.readline())  # time.time() of the first frame, shared by every camera

    def stream(first_at: float, count: int) -> int:
        """Publish `count` frames at the rate from `first_at` on; the number of late sends."""
        time.sleep(max(first_at - time.time(), 0.0))
        t0, late = time.monotonic(), 0
        for i in range(count):
            msg.header.stamp = node.get_clock().now().to_msg()
            publisher.publish(msg)
            wait = t0 + (i + 1) / spec["rate"] - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late += 1
        return late

    stream(start_at, int(round(spec["rate"] * WARM_UP_S)))
    t0 = time.monotonic()
    late = stream(start_at + WARM_UP_S + PAUSE_S, spec["count"])
    print(RESULT_TAG + json.dumps({"published": spec["count"], "matched": matched, "late": late,
                                   "bytes": len(msg.data), "seconds": time.monotonic() - t0 - PAUSE_S}), flush=True)
    time.sleep(0.5)  # let the last frames leave before the participant goes away
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


# ---------------------------------------------------------------------------------------------
# One case: its runs, in a process whose DDS settings are the case's


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else ""


def _publisher_result(proc: subprocess.Popen, count: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = _read_line(proc, max(deadline - time.monotonic(), 0.0))
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
        if not line and proc.poll() is not None:
            break
    return {"published": count, "matched": False, "stalled": True}  # counted as sent: the node missed them


def run_case(spec: dict) -> int:
    import yaml
    from diagnostic_msgs.msg import DiagnosticArray

    from omnivision_ros.ros.client import BackgroundNode

    node_env, publisher_env = dds_environment(spec["dds"], Path(spec["profiles_dir"]), spec["domain_id"])
    cameras = [f"cam{i}" for i in range(spec["cameras"])]
    suffix = "/image_raw/compressed" if spec["transport"] == "compressed" else "/image_raw"
    topics = {name: f"{NAMESPACE}/{name}{suffix}" for name in cameras}
    params = {"model": spec["model"], "camera_names": cameras,
              "cameras": {name: {"topic": topics[name], "transport": spec["transport"]} for name in cameras}}
    work = Path(tempfile.mkdtemp(prefix="omnivision-intake-"))
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**/omnivision_node": {"ros__parameters": params}}))

    observer = BackgroundNode("intake_observer")
    latest: dict[str, dict] = {}

    def on_diagnostics(msg) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        for status in msg.status:
            latest[status.name] = {"stamp": stamp, **{kv.key: kv.value for kv in status.values}}

    observer.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    count = int(round(spec["rate"] * spec["seconds"]))
    runs = []
    try:
        for run in range(spec["runs"]):
            latest.clear()
            log = open(work / f"node-{run}.log", "w")
            node = subprocess.Popen(
                [spec["node_python"], "-m", "omnivision_ros.node", "--ros-args", "-r", f"__ns:={NAMESPACE}",
                 "--params-file", str(params_file)],
                stdout=log, stderr=subprocess.STDOUT, cwd=spec["node_cwd"], env=node_env)
            publishers = []
            try:
                observer.wait_for(lambda: latest.get(f"{NODE}: model", {}).get("state") == "ready", 120.0,
                                  f"{NODE} loading its model (log: {log.name})")
                for i, name in enumerate(cameras):
                    publisher_spec = {"index": i, "topic": topics[name], "size": spec["size"], "rate": spec["rate"],
                                      "count": count, "transport": spec["transport"], "reliable": spec["reliable"]}
                    publishers.append(subprocess.Popen(
                        [sys.executable, "-m", "omnivision_ros.cli.bench_intake", "--publish",
                         json.dumps(publisher_spec)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=publisher_env))
                ready = [json.loads(_read_line(p, 40.0) or '{"ready": false}')["ready"] for p in publishers]
                start_at = time.time() + 0.5
                for p in publishers:
                    p.stdin.write(f"{start_at}\n")
                    p.stdin.flush()
                # The counters after the warm-up, from a diagnostics message sent during the pause.
                warm_end = start_at + WARM_UP_S
                observer.wait_for(lambda: all(latest.get(f"{NODE}: camera {n}", {}).get("stamp", 0) > warm_end + 0.3
                                              for n in cameras), WARM_UP_S + PAUSE_S + 5.0, "diagnostics after warm-up")
                warm = [int(latest[f"{NODE}: camera {n}"]["frames_received"]) for n in cameras]
                time.sleep(max(warm_end + PAUSE_S - time.time(), 0.0))
                cpu0, t0 = _cpu_seconds(node.pid), time.monotonic()
                time.sleep(spec["seconds"])
                cpu1, t1 = _cpu_seconds(node.pid), time.monotonic()
                # What each camera sent (a stalled camera reports late; its participant may also hang on exit).
                sent = [_publisher_result(p, count, 3 * spec["seconds"] + 30.0) for p in publishers]
                # The counters on a diagnostics message sent after the last frame could arrive.
                after = time.time() + 0.5
                observer.wait_for(lambda: all(latest.get(f"{NODE}: camera {n}", {}).get("stamp", 0) > after
                                              for n in cameras), 10.0, "diagnostics after the last frame")
                received = [int(latest[f"{NODE}: camera {n}"]["frames_received"]) - w for n, w in zip(cameras, warm)]
            finally:
                for p in publishers:
                    try:
                        p.wait(5.0)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                node.send_signal(signal.SIGINT)
                try:
                    node.wait(15.0)
                except subprocess.TimeoutExpired:
                    node.kill()
                log.close()
            published = sum(s["published"] for s in sent)
            runs.append({"published": published, "received": sum(received), "received_per_camera": received,
                         "received_pct": 100.0 * sum(received) / published if published else 0.0,
                         "node_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0),
                         "matched": all(ready) and all(s.get("matched") for s in sent),
                         "late_frames": sum(s.get("late", 0) for s in sent),
                         "stalled": any(s.get("stalled", False) for s in sent),
                         "publish_seconds": max(s.get("seconds", 0.0) for s in sent),
                         "frame_bytes": sent[0].get("bytes", 0), "loadavg": os.getloadavg()[0]})
            print(f"[intake]   run {run + 1}: {runs[-1]['received']}/{published} frames {received} matched {ready} "
                  f"({runs[-1]['received_pct']:.1f} %), node CPU {runs[-1]['node_cpu_pct']:.1f} %, "
                  f"load {runs[-1]['loadavg']:.2f}", file=sys.stderr, flush=True)
    finally:
        observer.close()
    shutil.rmtree(work, ignore_errors=True)  # kept (node logs) when a run failed
    print(RESULT_TAG + json.dumps(runs), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The table


def run(args: argparse.Namespace) -> int:
    sizes = [_size(s) for s in args.sizes.split(",") if s]
    rates = [float(r) for r in args.rates.split(",") if r]
    transports = [t for t in args.transports.split(",") if t]
    settings = [d for d in args.dds.split(",") if d]
    for t in transports:
        if t not in ("raw", "compressed"):
            raise OmniVisionError(f"transport '{t}': choose raw or compressed")
    for d in settings:
        if d not in DDS_SETTINGS:
            raise OmniVisionError(f"DDS setting '{d}': choose among {', '.join(DDS_SETTINGS)}")
    if args.cameras < 1 or args.runs < 1 or args.seconds <= 0:
        raise OmniVisionError("--cameras and --runs must be at least 1, --seconds positive")
    directory = Path(args.profiles_dir) if args.profiles_dir else profiles_dir()
    domain_id = int(os.environ.get("ROS_DOMAIN_ID") or 100 + os.getpid() % 100)
    node_cwd = args.node_cwd or os.getcwd()
    load_start = os.getloadavg()
    print(f"[intake] load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"ROS_DOMAIN_ID {domain_id}; node: {args.node_python} in {node_cwd}", file=sys.stderr, flush=True)
    results = []
    for setting in settings:
        # The case's own process observes /diagnostics with the node's settings.
        node_env, _ = dds_environment(setting, directory, domain_id)
        for (width, height) in sizes:
            for rate in rates:
                for transport in transports:
                    case = {"dds": setting, "size": [width, height], "rate": rate, "transport": transport,
                            "cameras": args.cameras, "seconds": args.seconds, "runs": args.runs,
                            "reliable": args.reliable, "model": args.model, "node_python": args.node_python,
                            "node_cwd": node_cwd, "profiles_dir": str(directory), "domain_id": domain_id}
                    print(f"[intake] {setting}: {args.cameras} x {width}x{height} {transport} at {rate:g} Hz",
                          file=sys.stderr, flush=True)
                    done = subprocess.run([sys.executable, "-m", "omnivision_ros.cli.bench_intake", "--case",
                                           json.dumps(case)], env=node_env, stdout=subprocess.PIPE, text=True)
                    line = next((s for s in done.stdout.splitlines() if s.startswith(RESULT_TAG)), None)
                    if done.returncode != 0 or line is None:
                        raise OmniVisionError(f"the {setting} {width}x{height} {transport} case failed (see above)")
                    runs = json.loads(line[len(RESULT_TAG):])
                    results.append(case | {"results": runs})
    load_end = os.getloadavg()
    print_table(results, args)
    print(f"load average at the start {load_start[0]:.2f}, at the end {load_end[0]:.2f} (1-minute)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results, "loadavg_start": load_start,
                                               "loadavg_end": load_end}, indent=1))
    return 0


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    qos = "reliable" if args.reliable else "best effort"
    print(f"\n{args.cameras} camera(s), {qos} publishers, {args.seconds:g} s per run, medians of {args.runs} run(s)\n")
    print("| DDS setting | frames | transport | frame bytes | published | received | node CPU (% of a core) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for case in results:
        runs = case["results"]
        pct = statistics.median(r["received_pct"] for r in runs)
        cpu = statistics.median(r["node_cpu_pct"] for r in runs)
        unmatched = "" if all(r["matched"] for r in runs) else " (not all matched)"
        unmatched += " (a camera stalled)" if any(r.get("stalled") for r in runs) else ""
        late = max(r["late_frames"] / r["published"] for r in runs)
        unmatched += f" ({100 * late:.0f} % of frames sent late)" if late > 0.05 else ""
        print(f"| {case['dds']} | {case['size'][0]}x{case['size'][1]} @ {case['rate']:g} Hz | {case['transport']} | "
              f"{runs[0]['frame_bytes']} | {runs[0]['published']} | {pct:.1f} %{unmatched} | {cpu:.1f} |")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.publish:
        return run_command("omnivision-bench-intake", lambda: publish(json.loads(args.publish)))
    if args.case:
        return run_command("omnivision-bench-intake", lambda: run_case(json.loads(args.case)), also=(TimeoutError,))
    return run_command("omnivision-bench-intake", lambda: run(args), also=(TimeoutError,))


if __name__ == "__main__":
    sys.exit(main())
