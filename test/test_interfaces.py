"""omnivision_interfaces messages over real DDS: a publisher and a subscriber node in one
process, on their own rclpy context (the domain and discovery range come from conftest.py)."""

import dataclasses
import time

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

from omnivision_interfaces.msg import Timing

DEADLINE_S = 10.0

@pytest.fixture
def context():
    ctx = Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def sample_timing():
    msg = Timing()
    msg.queue_ms = 1.5
    msg.encode_ms = 12.25
    msg.prefill_ms = 30.125
    msg.ttft_ms = 43.875
    msg.decode_ms = 250.0625
    msg.prompt_tokens = 96
    msg.new_tokens = 2**32 - 1  # full uint32 range survives serialization
    msg.tokens_per_second = 1.0 / 3.0
    msg.vision_cache_hit = True
    msg.prefix_cache_hit = False
    return msg


def test_timing_message_carries_every_figure_the_pipeline_measures():
    from omnivision_ros.runtime.pipeline import Timing as PipelineTiming

    fields = Timing.get_fields_and_field_types()
    measured = {f.name for f in dataclasses.fields(PipelineTiming)}
    assert measured <= set(fields), f"not in the message: {sorted(measured - set(fields))}"
    assert set(fields) - measured == {"queue_ms"}  # the node's own figure


def test_timing_round_trip_over_dds(context):
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub_node = rclpy.create_node('timing_publisher', context=context)
    sub_node = rclpy.create_node('timing_subscriber', context=context)
    received = []
    publisher = pub_node.create_publisher(Timing, 'timing', qos)
    sub_node.create_subscription(Timing, 'timing', received.append, qos)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(pub_node)
    executor.add_node(sub_node)
    sent = sample_timing()
    try:
        # Publish until discovery has matched the two endpoints and a message arrives.
        deadline = time.monotonic() + DEADLINE_S
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        pub_node.destroy_node()
        sub_node.destroy_node()

    assert received, f'no Timing message received within {DEADLINE_S} s'
    got = received[0]
    for name in Timing.get_fields_and_field_types():
        assert getattr(got, name) == getattr(sent, name), name
    assert got == sent
