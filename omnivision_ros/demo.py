"""omnivision-demo: the node end to end on this machine, without the ros2 CLI.

Makes sure a tiny model bundle exists (exports the `tiny` preset, random weights, into
engines/tiny once), starts omnivision_node as a subprocess, publishes a picture as a camera
would, calls ~/ask twice on the same frame (the second reuses the image embeddings and the
prompt prefix), ~/describe and ~/check (yes/no with a probability, on the same frame), prints
the answers with their timings, then stops the node with SIGINT like Ctrl-C would.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omnivision_ros.errors import run_command

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_IMAGE = PACKAGE_DIR / "data" / "sample.jpg"
NAMESPACE = "/omnivision_demo"
NODE = f"{NAMESPACE}/omnivision_node"
CAMERA_TOPIC = f"{NAMESPACE}/camera/image_raw"
DEADLINE_S = 60.0


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model bundle or preset to run (default: engines/tiny, exported if missing)")
    parser.add_argument("--image", default=str(SAMPLE_IMAGE), help="picture the fake camera publishes")
    parser.add_argument("--question", default="Is the door open?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    return parser


def ensure_tiny_bundle(path: Path) -> tuple[str, str]:
    """(model, note): the tiny bundle at `path`, exported now when missing; the tiny preset on the
    torch backend when this install cannot export."""
    if (path / "manifest.json").is_file():
        return str(path), f"reusing the bundle in {path} (tiny preset, random weights)"
    try:
        from omnivision_ros.export.cli import main as export_main
    except ImportError as exc:
        return "tiny", f"the export module is not available ({exc}): running the tiny preset on the torch backend"
    say(f"exporting the tiny preset (random weights) to {path} ...")
    t0 = time.perf_counter()
    if export_main(["--model", "tiny", "--out", str(path), "--no-progress", "--force"]) != 0:
        raise RuntimeError(f"exporting the tiny preset to {path} failed (see above)")
    return str(path), f"exported the tiny preset (random weights) to {path} in {time.perf_counter() - t0:.1f} s"


def params_file() -> str | None:
    """The shipped config: next to the package in a source checkout, else in the installed share dir."""
    candidate = PACKAGE_DIR.parent / "config" / "omnivision.yaml"
    if candidate.is_file():
        return str(candidate)
    try:
        from ament_index_python.packages import get_package_share_directory

        shared = Path(get_package_share_directory("omnivision_ros")) / "config" / "omnivision.yaml"
        return str(shared) if shared.is_file() else None
    except Exception:  # not installed with colcon: the node's defaults are the same values
        return None


def use_large_frame_profile() -> None:
    """Raw 640x480 frames need a Fast DDS profile on the camera and the node (docs/node.md, Camera
    intake): the shipped shm profile for this process (the camera) and the node it starts, unless the
    environment names a profile already. Fast DDS replaces a profile's transports when discovery is
    limited to localhost, so the discovery range is the subnet's (ROS 2's default) for this run."""
    from omnivision_ros.ros.dds import PROFILE_VARIABLES, profile_environment

    if any(os.environ.get(name) for name in PROFILE_VARIABLES):
        say("using the Fast DDS profile the environment names")
        return
    environment = profile_environment("shm")
    os.environ.update(environment)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SUBNET"
    say(f"raw camera frames: the shipped Fast DDS profile {next(iter(environment.values()))} for the camera "
        "and the node (discovery range SUBNET), as docs/node.md recommends")


def start_node(model: str, max_new_tokens: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "omnivision_ros.node", "--ros-args", "-r", f"__ns:={NAMESPACE}"]
    config = params_file()
    if config:
        cmd += ["--params-file", config]
    cmd += ["-p", f"model:={model}", "-p", f"max_new_tokens:={max_new_tokens}"]
    say("starting: " + " ".join(cmd[1:]))
    return subprocess.Popen(cmd)


def timing_line(t) -> str:
    cache = []
    if t.vision_cache_hit:
        cache.append("vision cache hit")
    if t.prefix_cache_hit:
        cache.append("prefix cache hit")
    return (f"queue {t.queue_ms:.1f} ms | encode {t.encode_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms "
            f"({t.prompt_tokens} tokens) | first token {t.ttft_ms:.1f} ms | {t.new_tokens} tokens, "
            f"{t.tokens_per_second:.1f} tok/s" + (f" | {', '.join(cache)}" if cache else ""))


def show(label: str, response) -> None:
    if not response.success:
        raise RuntimeError(f"{label} failed: {response.error}")
    stamp = response.header.stamp
    say(f"{label} -> {response.answer!r} ({response.stop_reason})")
    say(f"    camera '{response.camera}', frame {stamp.sec}.{stamp.nanosec:09d} '{response.header.frame_id}'")
    say(f"    {timing_line(response.timing)}")


def run(args: argparse.Namespace) -> int:
    import cv2
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from omnivision_interfaces.srv import Ask, Check, Describe
    from omnivision_ros.ros.client import BackgroundNode, image_msg

    picture = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if picture is None:
        raise RuntimeError(f"cannot read the picture {args.image}")
    if args.model:
        model, note = args.model, f"model {args.model}"
    else:
        model, note = ensure_tiny_bundle(Path("engines") / "tiny")
    say(note)
    use_large_frame_profile()

    node = start_node(model, args.max_new_tokens)
    client = BackgroundNode("omnivision_demo_client")
    try:
        camera = client.node.create_publisher(Image, CAMERA_TOPIC, qos_profile_sensor_data)
        streaming = [True]

        def publish_frame() -> None:
            if streaming[0]:
                camera.publish(image_msg(picture, client.now(), "demo_camera"))

        client.node.create_timer(0.2, publish_frame)
        say(f"publishing {args.image} ({picture.shape[1]}x{picture.shape[0]} bgr8) on {CAMERA_TOPIC} at 5 Hz")
        ask = client.node.create_client(Ask, f"{NODE}/ask")
        describe = client.node.create_client(Describe, f"{NODE}/describe")
        request = Ask.Request(question=args.question, max_age_s=10.0)
        client.wait_for(lambda: ask.service_is_ready() or node.poll() is not None, DEADLINE_S, f"{NODE}/ask")
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with code {node.returncode} (see its log above)")

        client.wait_for(lambda: camera.get_subscription_count() > 0, DEADLINE_S, "the node subscribing to the camera")
        time.sleep(1.0)  # a few frames, while discovery completes on the node's side too
        # The first answer waits for the model to load. The camera then holds still, so the
        # second question is about the same frame and reuses the work done for the first.
        deadline = time.monotonic() + DEADLINE_S
        while True:
            time.sleep(0.5)
            streaming[0] = False
            first = client.call(ask, request, timeout_s=max(deadline - time.monotonic(), 1.0))
            if first.success or "no frame received yet" not in first.error or time.monotonic() > deadline:
                break
            streaming[0] = True
        show(f"ask {args.question!r}", first)
        second = client.call(ask, request, timeout_s=30.0)
        show(f"ask again, same frame {args.question!r}", second)
        if second.timing.ttft_ms > 0:
            say(f"    first token {second.timing.ttft_ms:.1f} ms instead of {first.timing.ttft_ms:.1f} ms "
                "(image embeddings and prompt prefix reused)")
        described = client.call(describe, Describe.Request(max_age_s=10.0), timeout_s=30.0)
        show("describe", described)
        check = client.node.create_client(Check, f"{NODE}/check")
        client.wait_for(check.service_is_ready, DEADLINE_S, f"{NODE}/check")
        decided = client.call(check, Check.Request(question=args.question, max_age_s=10.0), timeout_s=30.0)
        if decided.success:
            say(f"check {args.question!r} -> {'yes' if decided.answer else 'no'}, p_yes {decided.probability:.4f}, "
                f"yes/no mass {decided.yes_no_mass:.3g} (a random model barely answers yes/no: low mass)")
            t = decided.timing
            say(f"    decision {t.ttft_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms ({t.prompt_tokens} tokens), no decoding"
                + (" | vision cache hit, prefix cache hit" if t.vision_cache_hit and t.prefix_cache_hit else ""))
        else:
            stale = "" if args.model else " (a bundle from an older version: delete engines/tiny to re-export it)"
            say(f"check {args.question!r} failed: {decided.error}{stale}")
    finally:
        client.close()
        code = stop_node(node)
    return 0 if code == 0 else 1


def stop_node(node: subprocess.Popen) -> int:
    if node.poll() is None:
        say("stopping the node (SIGINT, as Ctrl-C) ...")
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
            say("the node did not stop within 15 s and was killed")
            return 1
    say(f"node exited with code {node.returncode}")
    return node.returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("omnivision-demo", lambda: run(args), also=(RuntimeError, TimeoutError), code=1)


if __name__ == "__main__":
    sys.exit(main())
