"""The agent's MQTT link: presence, desired releases in, states out, and block fetches.

Small files (TUF metadata) are request/response: the agent publishes `{req, path, offset, length}`
on its `fetch` topic and the fleet answers on `blocks`. Targets are broadcast: the agent subscribes
to the target's stream, then asks for the blocks it lacks (a bitmap), and stores whatever blocks of
that target the stream carries, whoever asked for them (docs/protocol.md). Progress is persisted
block by block (agent/partial.py), so an agent restarted mid-download asks only for what it lacks
(crash tests kill it after its Nth stored block with EDGEOPS_FAILPOINT=after:block:N). Nothing
received here is trusted: the caller verifies all of it against signed metadata. Stopping takes at
most a few seconds whatever the network does: waits for the fleet give up (FetchError) as soon as
the agent stops, and `stop` does not wait for paho longer than STOP_S.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from edgeops.agent.partial import PartialDownload
from edgeops.agent.slots import failpoint
from edgeops.agent.trust import TrustError
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
BLOCK_TIMEOUT_S = 10.0
BLOCK_RETRIES = 5
STREAM_QUIET_S = 2.0  # no new block of the target for this long: ask again for what is missing
POLL_S = 0.2  # how often a wait for the fleet looks whether the agent is stopping
GOODBYE_S = 1.0  # the longest `stop` waits for the broker to take the offline state
STOP_S = 2.0  # the longest `stop` waits for paho's thread (a daemon: it cannot hold the process up)


class FetchError(EdgeopsError):
    """A fetch that did not complete (fleet unreachable, file missing); retried later."""


class NotFound(FetchError, FileNotFoundError):
    """The fleet has no such file: how the trust store learns there is no newer root."""


class Link:
    """One device's MQTT session. Callbacks run on paho's thread; fetches block the caller."""

    def __init__(self, device_id: str, broker_url: str, on_desired: Callable[[dict[str, Any]], None],
                 tls: mqttlib.TlsFiles | None = None, keepalive: int = mqttlib.KEEPALIVE_S,
                 trusted_time: Callable[[], float] | None = None):
        self.device_id = device_id
        self._on_desired = on_desired
        self._replies: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        self._request = 0
        self._fetch_lock = threading.Lock()
        self._stream_path: str | None = None  # the target being streamed in, if any
        self._stream: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        self._subscribe_lock = threading.Lock()
        self._subacks: dict[int, queue.Queue[None]] = {}
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self.epoch = 0  # connections made so far: a new value means unacknowledged publishes may be lost
        self.on_ack: Callable[[list[int]], None] | None = None  # seqs of telemetry the fleet stored
        self.on_cert: Callable[[bytes], None] | None = None  # a certificate the fleet offers this device
        self._state: bytes | None = None  # the last state reported, published again on each reconnection
        offline = wire.encode({"device": device_id, "online": False})
        # A device's wall clock may be wrong (agent/clock.py): the broker certificate's dates are
        # judged against `trusted_time` (the time floor) instead, so a clock set back does not cut
        # the device off, and one set forward does not either.
        self._trusted_time = trusted_time
        self.client = mqttlib.client(f"edgeops-agent-{device_id}", broker_url, tls,
                                     will=(wire.topic(device_id, "state"), offline), keepalive=keepalive,
                                     check_time=trusted_time is None)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def start(self, stopping: threading.Event | None = None) -> "Link":
        """Run paho's network thread; waits for the fleet give up once `stopping` (the agent's stop) is set."""
        if stopping is not None:
            self._stopping = stopping
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Disconnect, and let paho's thread end within STOP_S: with a broker that does not answer,
        paho would otherwise hold on to its unacknowledged publishes until the keepalive gives up."""
        self._stopping.set()
        if self.connected.is_set():  # say goodbye, as the will would: a stopped agent is not left "online"
            offline = wire.encode({"device": self.device_id, "online": False})
            info = self.client.publish(wire.topic(self.device_id, "state"), offline, qos=1, retain=True)
            try:
                info.wait_for_publish(GOODBYE_S)
            except (RuntimeError, ValueError):  # the link broke meanwhile: the broker sends the will
                pass
        self.client.disconnect()
        stopper = threading.Thread(target=self.client.loop_stop, name="edgeops-mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_S)

    def _get(self, source: queue.Queue, timeout: float) -> Any:
        """`source.get(timeout=timeout)`, but FetchError as soon as the link is stopping."""
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set():
            try:
                return source.get(timeout=min(POLL_S, max(deadline - time.monotonic(), 0.0)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise
        raise FetchError("the agent is stopping")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._forget_telemetry_publishes()
        if reason_code.is_failure:
            log.error("broker refused %s: %s", self.device_id, reason_code)
            return
        problem = self._broker_certificate_problem()
        if problem:
            log.error("%s: disconnecting", problem)
            client.disconnect()
            return
        topics = [(wire.topic(self.device_id, leaf), 1) for leaf in wire.DEVICE_SUBSCRIBES]
        if self._stream_path:  # a session the broker lost: the stream subscription went with it
            topics.append((wire.stream_topic(self._stream_path), 1))
        client.subscribe(topics)
        if self._state is not None:  # the broker published our will (offline) when the link broke: online again
            self._publish_state()
        self.epoch += 1
        self.connected.set()

    def _broker_certificate_problem(self) -> str:
        """What is wrong with the broker's certificate beyond what TLS checked, or '': it must be the
        broker's (another server certificate of the fleet CA, the API's, is not), and not expired
        by the trusted time."""
        sock = self.client.socket()
        if not hasattr(sock, "getpeercert"):
            return ""  # not TLS (loopback)
        cert = sock.getpeercert() or {}
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        if names != [mqttlib.BROKER_CN]:
            return f"the server's certificate is for {names}, not the fleet's broker"
        not_after = cert.get("notAfter")
        if self._trusted_time is not None and not_after and ssl.cert_time_to_seconds(not_after) < self._trusted_time():
            return f"the broker's certificate expired on {not_after} (by this device's trusted time)"
        return ""

    def _forget_telemetry_publishes(self) -> None:
        """Drop the telemetry publishes of earlier connections that paho still holds unacknowledged.

        paho keeps unacknowledged QoS 1 publishes in memory and sends them again on reconnection (it
        calls on_connect just before). For telemetry that is wrong: the outbox is its queue, and the
        forwarder sends what is still there again on each new connection (agent/telemetry.py). A record
        the outbox dropped while the link was down would otherwise reach the fleet from paho's copy and
        be counted both received and dropped. paho offers no API for this, hence its private fields.
        """
        topic = wire.topic(self.device_id, "telemetry")
        with self.client._out_message_mutex:
            stale = [mid for mid, message in self.client._out_messages.items() if message.topic == topic]
            for mid in stale:
                del self.client._out_messages[mid]

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._subscribe_lock:
            done = self._subacks.pop(mid, None)
        if done is not None and not any(code.is_failure for code in reason_codes):
            done.put(None)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            # Only this device's exact topics, and the stream being received: a broker that
            # delivers anything else (as the embedded amqtt did) is not acted on.
            if message.topic.startswith(wire.STREAMS + "/"):
                if self._stream_path and message.topic == wire.stream_topic(self._stream_path):
                    self._stream.put(wire.parse_stream_block(message.payload))
                return
            device_id, leaf = wire.parse_topic(message.topic)
            if device_id != self.device_id:
                raise wire.WireError("not this device's topic")
            if leaf == "desired":
                self._on_desired(wire.decode(message.payload, {}))
            elif leaf == "blocks":
                header, data = wire.parse_block_reply(message.payload)
                streamed = "error" in header and header["path"] == self._stream_path
                (self._stream if streamed else self._replies).put((header, data))
            elif leaf == "acks" and self.on_ack is not None:
                self.on_ack(wire.parse_telemetry_ack(message.payload))
            elif leaf == "cert" and self.on_cert is not None and message.payload:
                self.on_cert(message.payload)
        except wire.WireError as exc:
            log.warning("dropped message on %s: %s", message.topic, exc)
        except Exception:  # never let a callback kill paho's network thread
            log.exception("error handling message on %s", message.topic)

    def report(self, state: dict[str, Any]) -> None:
        """Publish the device's state (retained, so the fleet sees the latest even after a restart),
        and again after each reconnection, so the will the broker sent meanwhile is not the last word."""
        self._state = wire.encode({"device": self.device_id, **state})
        self._publish_state()

    def _publish_state(self) -> None:
        self.client.publish(wire.topic(self.device_id, "state"), self._state, qos=1, retain=True)

    def publish_telemetry(self, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(wire.topic(self.device_id, "telemetry"), payload, qos=1)

    def _block(self, path: str, offset: int) -> tuple[int, bytes]:
        """One block at `offset`: (total size, data). Retries on silence; FetchError when it gives up."""
        for _ in range(BLOCK_RETRIES):
            self._request += 1
            request = self._request
            self.client.publish(wire.topic(self.device_id, "fetch"), wire.fetch_request(request, path, offset), qos=1)
            try:
                while True:
                    header, data = self._get(self._replies, BLOCK_TIMEOUT_S)
                    if header["req"] == request:
                        break  # replies to earlier, timed-out requests are stale: skip them
            except queue.Empty:
                continue
            if "error" in header:
                raise NotFound(f"fleet could not serve {path}: {header['error']}")
            if header["offset"] != offset:
                raise FetchError(f"fleet answered {path} at offset {header['offset']}, asked {offset}")
            return header["total"], data
        raise FetchError(f"no answer from the fleet for {path} after {BLOCK_RETRIES} tries")

    def fetch(self, path: str, limit: int) -> bytes:
        """A whole (small) file, e.g. metadata; refuses to hold more than `limit` bytes."""
        with self._fetch_lock:
            chunks, offset, total = [], 0, None
            while total is None or offset < total:
                total, data = self._block(path, offset)
                if total > limit:
                    raise TrustError("length", f"{path} is {total} bytes, more than the {limit} allowed")
                if not data and offset < total:
                    raise FetchError(f"fleet sent an empty block for {path} at {offset}")
                chunks.append(data)
                offset += len(data)
            return b"".join(chunks)

    def download(self, path: str, dest: Path, length: int) -> Path:
        """Download target `path` into `dest` from its stream, resuming a partial download, never
        more than the signed `length`.

        A fleet announcing another size than the signed `length` is refused with TrustError("length")
        (docs/protocol.md: endless-data attack), so the caller reports it instead of retrying forever.
        """
        with self._fetch_lock:
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = PartialDownload(dest, length)
            partial.check_room()
            topic = wire.stream_topic(path)
            self._stream = queue.Queue()
            self._stream_path = path
            try:
                self._subscribe(topic)
                idle = 0
                while missing := partial.missing():
                    self._request += 1
                    self.client.publish(wire.topic(self.device_id, "fetch"),
                                        wire.stream_request(self._request, path, missing), qos=1)
                    idle = 0 if self._receive(path, partial) else idle + 1
                    if idle >= BLOCK_RETRIES:
                        raise FetchError(f"no block of {path} arrived after {BLOCK_RETRIES} requests")
            finally:
                self._stream_path = None
                self.client.unsubscribe(topic)
            return partial.finish()

    def _subscribe(self, topic: str) -> None:
        """Subscribe and wait for the broker's acknowledgement, so no block published later is missed."""
        done: queue.Queue[None] = queue.Queue()
        with self._subscribe_lock:
            result, mid = self.client.subscribe(topic, 1)
            self._subacks[mid] = done
        try:
            if result != mqtt.MQTT_ERR_SUCCESS:
                raise queue.Empty
            self._get(done, BLOCK_TIMEOUT_S)
        except queue.Empty:
            raise FetchError(f"could not subscribe to {topic}") from None

    def _receive(self, path: str, partial: PartialDownload) -> int:
        """Store blocks of `path` from the stream until it is complete or STREAM_QUIET_S pass without
        a new one; returns how many were new."""
        received = 0
        while partial.missing():
            try:
                arrived = [self._get(self._stream, STREAM_QUIET_S)]
            except queue.Empty:
                return received
            while not self._stream.empty():  # store a burst with one sync
                arrived.append(self._stream.get_nowait())
            blocks = {}
            for header, data in arrived:
                if header["path"] != path:
                    continue
                if "error" in header:
                    raise NotFound(f"fleet could not serve {path}: {header['error']}")
                if header["total"] != partial.length:  # endless data (or a truncated file): refused
                    raise TrustError("length", f"the fleet offers {path} as {header['total']} bytes "
                                               f"but {partial.length} were signed")
                index = header["offset"] // wire.MAX_BLOCK
                if index not in partial.have and len(data) == partial.block_size(index):
                    blocks[index] = data
            if blocks:
                stored = len(partial.have) - partial.resumed
                partial.write(blocks)
                received += len(blocks)
                for number in range(stored + 1, stored + len(blocks) + 1):
                    failpoint(f"after:block:{number}")  # counts blocks stored by this process
        return received
