"""The gateway's lean MQTT session (gridledger/mqttlink.py): the framing against the
standard's tables, the parser against every split of a byte stream, and the session
against a real Mosquitto: what it receives and sends arrives whole and in order, a
refused login or subscription is a `LinkError` with the broker's reason, and a
silent broker is noticed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl

import aiomqtt
import pytest

from gridledger.broker import free_port, run_mosquitto
from gridledger.brokerauth import hash_password
from gridledger.config import MqttConfig
from gridledger.mqttlink import MAX_PACKET, Link, LinkError, _remaining_length, open_link, publish_frame


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


@pytest.mark.parametrize("remaining", [25, 126, 127, 128, 16_383, 16_384, 1_300_025])
def test_publish_frame_is_the_spec_s_layout_at_every_length_boundary(remaining):
    """Fixed header, remaining length, topic length and topic, payload, whichever
    path builds it (one-byte length for an ack, joined parts for a proposal), and the
    topic's cached encoding changes nothing on a second call."""
    topic = "gl/v1/a/meters/m-é/ack"
    t = topic.encode()
    size = remaining - 2 - len(t)  # 23 bytes of topic: the remaining length is `remaining`
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    body = len(t).to_bytes(2, "big") + t + payload
    assert len(body) == remaining
    expected = b"\x30" + _remaining_length(len(body)) + body
    assert publish_frame(topic, payload) == expected == publish_frame(topic, payload)


class Wire:
    """A transport that records what the link writes and whether it aborted."""

    def __init__(self):
        self.written, self.aborted = [], False

    def write(self, data):
        self.written.append(bytes(data))

    def abort(self):
        self.aborted = True

    def is_closing(self):
        return self.aborted

    def get_extra_info(self, _name):
        return None


def fed(chunks) -> tuple[Link, list, Wire]:
    got: list[tuple[str, bytes]] = []
    link = Link(lambda t, p: got.append((t, p)))
    wire = Wire()
    link.connection_made(wire)
    for c in chunks:
        link.data_received(c)
    return link, got, wire


MESSAGES = [("a/b", b"x"), ("gl/v1/t/meters/µ/readings", "é".encode() * 100), ("big/one", bytes(range(256)) * 80),
            ("e", b"")]
STREAM = b"".join(publish_frame(t, p) for t, p in MESSAGES) + b"\xd0\x00"  # and a PINGRESP


async def test_every_split_of_the_stream_gives_the_same_messages():
    for cut in range(1, len(STREAM)):
        _, got, wire = fed([STREAM[:cut], STREAM[cut:]])
        assert got == MESSAGES and not wire.aborted, cut
    _, got, _ = fed([STREAM[i:i + 1] for i in range(len(STREAM))])  # one byte at a time
    assert got == MESSAGES


async def test_a_qos1_publish_is_answered_with_its_puback():
    body = b"\x00\x03a/b" + b"\x12\x34" + b"payload"
    link, got, wire = fed([b"\x32" + _remaining_length(len(body)) + body])
    assert got == [("a/b", b"payload")] and wire.written == [b"\x40\x02\x12\x34"]


async def test_an_oversized_packet_is_skipped_and_what_follows_is_intact():
    big = b"\x00\x01x" + b"z" * (MAX_PACKET + 10)
    stream = b"\x30" + _remaining_length(len(big)) + big + publish_frame("after", b"ok")
    link, got, wire = fed([stream[i:i + 65536] for i in range(0, len(stream), 65536)])
    assert got == [("after", b"ok")] and link.oversized == 1 and not wire.aborted
    assert len(link._buf) == 0


async def test_malformed_input_aborts_without_raising():
    link, got, wire = fed([b"\x30\xff\xff\xff\xff\x01"])          # a five-byte remaining length
    assert wire.aborted and got == []
    link, got, wire = fed([b"\x30\x05\x00\x09abc"])                # a topic longer than the packet
    assert wire.aborted and got == []
    link, got, wire = fed([publish_frame("x", b"1")[:1] + b"\x04\x00\x02\xff\xfe" + publish_frame("y", b"2")])
    assert got == [("y", b"2")] and link.undecodable == 1 and not wire.aborted  # a non-UTF-8 topic is dropped


@pytest.mark.parametrize("coalesce_s", [0.0, 0.002], ids=["at-once", "coalesced"])
async def test_a_session_receives_and_sends_everything_in_order(broker, coalesce_s):
    got: list[tuple[str, bytes]] = []
    cfg = MqttConfig(host=broker.host, port=broker.port)
    link = await open_link(cfg, "link-test", "gl/v1/t/meters/+/readings", lambda t, p: got.append((t, p)),
                           coalesce_s=coalesce_s)
    sent = [(f"gl/v1/t/meters/m{i % 7}/readings", os.urandom(i % 1500)) for i in range(300)]
    sent += [("gl/v1/t/meters/µ-ü/readings", b"utf-8 topic"), ("gl/v1/t/meters/big/readings", os.urandom(100_000))]
    acks = [(f"gl/v1/t/meters/m{i}/ack", b'{"seq": %d}' % i) for i in range(200)]
    heard: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="link-peer") as peer:
        await peer.subscribe("gl/v1/t/meters/+/ack", qos=0)
        for t, p in sent:
            await peer.publish(t, p, qos=1)
        async with asyncio.timeout(10):
            while len(got) < len(sent):
                await asyncio.sleep(0.02)
        assert link.publish_many(acks) == len(acks)
        async with asyncio.timeout(10):
            async for msg in peer.messages:
                heard.append((msg.topic.value, bytes(msg.payload)))
                if len(heard) == len(acks):
                    break
    assert got == sent and heard == acks
    if coalesce_s:  # one publish at a time, each awaiting its PUBACK: a trickle, read in groups
        assert link.reads < len(sent) / 2, link.reads
    await link.close()
    assert not link.is_open and link.publish_many(acks) == 0


@pytest.fixture
def locked(tmp_path):
    """Mosquitto with one account, `gw`, allowed to read only gl/v1/t/#."""
    port = free_port()
    (tmp_path / "passwd").write_text(f"gw:{hash_password('right')}\n")
    (tmp_path / "acl").write_text("user gw\ntopic read gl/v1/t/#\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "") +
                    f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence false\nlog_dest stderr\n"
                    f"password_file {tmp_path / 'passwd'}\nacl_file {tmp_path / 'acl'}\n")
    b = run_mosquitto(conf, port, tmp_path / "mosquitto.log")
    yield port
    b.stop()


async def test_a_refused_login_or_subscription_says_why(locked):
    with pytest.raises(LinkError, match="not authorized|bad user name or password"):
        await open_link(MqttConfig(port=locked, username="gw", password="wrong"), "x", "gl/v1/t/#", print)
    with pytest.raises(LinkError, match="not authorized|bad user name or password"):
        await open_link(MqttConfig(port=locked), "x", "gl/v1/t/#", print)
    link = await open_link(MqttConfig(port=locked, username="gw", password="right"), "x", "gl/v1/t/+/r", print)
    await link.close()


async def test_a_refused_subscription_says_so():
    """Mosquitto grants 3.1.1 subscriptions its ACL will not feed; a broker that refuses
    one answers 0x80 in the SUBACK, and the link must not report success then."""
    async with scripted(b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x80") as port:
        with pytest.raises(LinkError, match="refused the subscription"):
            await open_link(MqttConfig(port=port), "x", "a/#", print)


async def test_an_unreachable_broker_is_an_os_error():
    with pytest.raises(OSError):
        await open_link(MqttConfig(port=free_port()), "x", "a/#", print, timeout=3)


@contextlib.asynccontextmanager
async def scripted(connack: bytes, suback: bytes):
    """A one-connection server that answers CONNECT and SUBSCRIBE as told, then stays silent."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    loop = asyncio.get_running_loop()

    async def serve() -> None:
        conn, _ = await loop.sock_accept(server)
        with conn:
            await loop.sock_recv(conn, 1024)
            await loop.sock_sendall(conn, connack)
            await loop.sock_recv(conn, 1024)
            await loop.sock_sendall(conn, suback)
            await asyncio.sleep(30)

    task = asyncio.create_task(serve())
    try:
        yield server.getsockname()[1]
    finally:
        task.cancel()
        server.close()


async def test_a_silent_broker_is_noticed_by_the_keepalive():
    """A server that accepts the session and then says nothing more: the link closes
    itself after 1.5 keepalives instead of waiting forever."""
    async with scripted(b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00") as port:
        link = await open_link(MqttConfig(port=port, keepalive=1), "x", "a/#", print)
        async with asyncio.timeout(5):
            await asyncio.gather(link.keepalive(1), link.closed)
        assert not link.is_open


async def test_tls_trusts_only_the_given_ca(tmp_path):
    """Over Mosquitto's TLS listener: a link trusting the broker's CA works both ways;
    one trusting another CA is refused before any MQTT is spoken."""
    from gridledger.brokertls import make_testbed_ca
    certs = make_testbed_ca(tmp_path / "ca", ["127.0.0.1"])
    other = make_testbed_ca(tmp_path / "other", ["127.0.0.1"])
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "") +
                    f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
                    f"cafile {certs['ca.crt']}\ncertfile {certs['server.crt']}\nkeyfile {certs['server.key']}\n")
    b = run_mosquitto(conf, port, tmp_path / "mosquitto.log")
    try:
        got: list[tuple[str, bytes]] = []
        link = await open_link(MqttConfig(port=port, tls_ca=certs["ca.crt"]), "tls-a", "t/#",
                               lambda t, p: got.append((t, p)))
        assert link.publish_many([("t/x", b"over tls")]) == 1   # to itself, through the broker
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.02)
        assert got == [("t/x", b"over tls")]
        await link.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_link(MqttConfig(port=port, tls_ca=other["ca.crt"]), "tls-b", "t/#", print)
    finally:
        b.stop()
