"""One way to open an MQTT connection, shared by the fleet and the agent (paho-mqtt, MQTT 3.1.1).

Sessions are persistent (clean_session=False) so QoS 1 messages queued at the broker while a client
was away are delivered when it returns; paho reconnects by itself with exponential backoff.
Connections are TLS (`mqtts://`): the client checks the broker's certificate against the fleet CA
it pins and the host name it dials, and proves its own identity with its certificate (the broker
takes the identity from it). Plain `mqtt://` is accepted only to a loopback address, where no one
else is on the path. Sockets set TCP_NODELAY: MQTT exchanges are small request/answer packets, and Nagle's algorithm
with delayed ACKs added about 40 ms to each (measured: a fetch round trip went from ~86 ms to ~1 ms
with Mosquitto's `set_tcp_nodelay true` as well).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from edgeops.protocol.errors import EdgeopsError

KEEPALIVE_S = 30  # a silent connection is given up after 1.5-2x this (paho, Mosquitto)
TLS_PORT = 8883
BROKER_CN = "edgeops broker"  # the subject of the broker's certificate (fleet/home.py), which clients check
NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which Python's ssl.VerifyFlags does not name


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = True

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtts", "mqtt") or not parts.hostname:
            raise EdgeopsError(f"broker URL {url!r} must look like mqtts://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise EdgeopsError(f"broker URL {url!r} has a bad port") from None
        tls = parts.scheme == "mqtts"
        if not tls and not is_loopback(parts.hostname):
            raise EdgeopsError(f"broker URL {url!r} is plaintext to another machine; use mqtts://{parts.hostname}:{TLS_PORT}")
        return cls(parts.hostname, port or (TLS_PORT if tls else 1883), tls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A client's TLS material: the CA it pins, its certificate and its key (PEM files)."""
    ca: Path
    cert: Path
    key: Path

    def context(self, check_time: bool = True) -> ssl.SSLContext:
        """TLS 1.2+, the broker verified against `ca` and the host name, this client's certificate
        offered. Without `check_time` the broker certificate's validity dates are not checked against
        the wall clock: a device whose clock is wrong checks them itself, against time it trusts."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not check_time:
            context.verify_flags |= NO_CHECK_TIME
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise EdgeopsError(f"cannot load the TLS certificate {self.cert} and key {self.key}: {exc}") from None
        return context


def client(client_id: str, url: str, tls: TlsFiles | None = None, will: tuple[str, bytes] | None = None,
           keepalive: int = KEEPALIVE_S, check_time: bool = True) -> mqtt.Client:
    """A connected-on-start client: call `.loop_start()` after setting callbacks; it connects
    asynchronously. `check_time`: see `TlsFiles.context`."""
    address = BrokerAddress.parse(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                    protocol=mqtt.MQTTv311)
    if address.tls:
        if tls is None:
            raise EdgeopsError(f"{url} is a TLS broker: this client needs a certificate from the fleet CA")
        c.tls_set_context(tls.context(check_time))
    if will:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    c.max_inflight_messages_set(100)
    c.on_socket_open = _no_delay
    c.connect_async(address.host, address.port, keepalive=keepalive)
    return c


def _no_delay(client: mqtt.Client, userdata, sock) -> None:
    if hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
