"""`publish_many` frames QoS 0 PUBLISH packets itself and hands them to paho as one
write: a real Mosquitto must deliver every one, intact and in order, whatever the
topic's and payload's lengths (one- to three-byte remaining lengths, UTF-8 topics)."""

from __future__ import annotations

import asyncio

import aiomqtt

from gridledger.mqtt import _remaining_length, publish_frame, publish_many


def test_remaining_length_matches_the_spec_table():
    # MQTT 3.1.1 §2.2.3, table 2.4: the boundaries of each encoded length.
    assert _remaining_length(0) == b"\x00"
    assert _remaining_length(127) == b"\x7f"
    assert _remaining_length(128) == b"\x80\x01"
    assert _remaining_length(16_383) == b"\xff\x7f"
    assert _remaining_length(16_384) == b"\x80\x80\x01"
    assert _remaining_length(2_097_151) == b"\xff\xff\x7f"
    assert _remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


def test_publish_frame_is_a_qos0_publish():
    assert publish_frame("a/b", b"xy") == b"\x30\x07\x00\x03a/bxy"


async def test_a_batch_arrives_whole_and_in_order(broker):
    messages = [(f"gl/v1/t/meters/m{i}/ack", b'{"seq": %d}' % i) for i in range(300)]
    messages += [("gl/v1/t/meters/µ-ü/ack", "é".encode() * 70),          # UTF-8 topic, 2-byte length
                 ("gl/v1/t/meters/big/ack", bytes(range(256)) * 100)]    # 3-byte length
    got: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="frames-sub") as sub, \
            aiomqtt.Client(broker.host, broker.port, identifier="frames-pub") as pub:
        await sub.subscribe("gl/v1/t/meters/+/ack", qos=0)
        await asyncio.sleep(0.2)
        assert publish_many(pub, messages) == len(messages)
        assert publish_many(pub, []) == 0
        # The connection still works the ordinary way after the framed write.
        await pub.publish("gl/v1/t/meters/after/ack", b"last", qos=1)
        async with asyncio.timeout(10):
            async for msg in sub.messages:
                got.append((msg.topic.value, bytes(msg.payload)))
                if msg.topic.value.endswith("/after/ack"):
                    break
    assert got == messages + [("gl/v1/t/meters/after/ack", b"last")]


async def test_nothing_is_queued_when_not_connected(broker):
    client = aiomqtt.Client(broker.host, broker.port, identifier="frames-off")
    assert publish_many(client, [("a/b", b"x")]) == 0
