"""The agent's MQTT link: presence, desired releases in, states out, and block fetches.

Fetching is request/response over MQTT: the agent publishes `{req, path, offset, length}` on its
`fetch` topic and the fleet answers on `blocks` (docs/protocol.md). Targets are downloaded into
`downloads/<sha256>.part`, appended block by block and fsync'd, so an agent restarted mid-download
resumes at the file's length instead of starting over (crash tests kill the agent after the Nth
block of a download with EDGEOPS_FAILPOINT=after:block:N). Nothing received here is trusted: the
caller verifies all of it against signed metadata.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from edgeops.agent.slots import failpoint
from edgeops.agent.trust import TrustError
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
BLOCK_TIMEOUT_S = 10.0
BLOCK_RETRIES = 5


class FetchError(EdgeopsError):
    """A fetch that did not complete (fleet unreachable, file missing); retried later."""


class NotFound(FetchError, FileNotFoundError):
    """The fleet has no such file: how the trust store learns there is no newer root."""


class Link:
    """One device's MQTT session. Callbacks run on paho's thread; fetches block the caller."""

    def __init__(self, device_id: str, broker_url: str, on_desired: Callable[[dict[str, Any]], None],
                 username: str | None = None, password: str | None = None):
        self.device_id = device_id
        self._on_desired = on_desired
        self._replies: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        self._request = 0
        self._fetch_lock = threading.Lock()
        self.connected = threading.Event()
        offline = wire.encode({"device": device_id, "online": False})
        self.client = mqttlib.client(f"edgeops-agent-{device_id}", broker_url, username, password,
                                     will=(wire.topic(device_id, "state"), offline))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_message = self._on_message

    def start(self) -> "Link":
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused %s: %s", self.device_id, reason_code)
            return
        client.subscribe([(wire.topic(self.device_id, "desired"), 1), (wire.topic(self.device_id, "blocks"), 1)])
        self.connected.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            _, leaf = wire.parse_topic(message.topic)
            if leaf == "desired":
                self._on_desired(wire.decode(message.payload, {}))
            elif leaf == "blocks":
                self._replies.put(wire.parse_block_reply(message.payload))
        except wire.WireError as exc:
            log.warning("dropped message on %s: %s", message.topic, exc)
        except Exception:  # never let a callback kill paho's network thread
            log.exception("error handling message on %s", message.topic)

    def report(self, state: dict[str, Any]) -> None:
        """Publish the device's state (retained, so the fleet sees the latest even after a restart)."""
        self.client.publish(wire.topic(self.device_id, "state"), wire.encode({"device": self.device_id, **state}),
                            qos=1, retain=True)

    def _block(self, path: str, offset: int) -> tuple[int, bytes]:
        """One block at `offset`: (total size, data). Retries on silence; FetchError when it gives up."""
        for _ in range(BLOCK_RETRIES):
            self._request += 1
            request = self._request
            self.client.publish(wire.topic(self.device_id, "fetch"), wire.fetch_request(request, path, offset), qos=1)
            try:
                while True:
                    header, data = self._replies.get(timeout=BLOCK_TIMEOUT_S)
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

    def download(self, path: str, dest: Path, length: int, progress: Callable[[int, int], None] | None = None) -> Path:
        """Download into `dest` (resuming a partial file), never more than the signed `length`.

        A fleet announcing another size than the signed `length` is refused with TrustError("length")
        (docs/protocol.md: endless-data attack), so the caller reports it instead of retrying forever.
        """
        with self._fetch_lock:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "ab") as fh:
                offset, blocks = fh.tell(), 0
                while offset < length:
                    total, data = self._block(path, offset)
                    if total != length:  # endless data (or a truncated file): refused, not retried
                        raise TrustError("length", f"the fleet offers {path} as {total} bytes but {length} were signed")
                    if not data:
                        raise FetchError(f"fleet sent an empty block for {path} at {offset}")
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                    offset += len(data)
                    blocks += 1
                    failpoint(f"after:block:{blocks}")
                    if progress:
                        progress(offset, length)
            return dest
