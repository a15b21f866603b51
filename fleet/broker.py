"""The embedded MQTT broker (amqtt): the zero-setup default of `edgeops fleet serve`.

It runs its own asyncio loop in a daemon thread, so the rest of the fleet stays synchronous. For
production fleets point `--broker` at Mosquitto (or any MQTT 3.1.1 broker) and use the generated
password and ACL files; the embedded broker allows anonymous clients on the address it binds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host`, for a broker or server started just after."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="edgeops-broker", daemon=True)
        self._error: BaseException | None = None
        self._started = threading.Event()  # set once listening, or once starting failed

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        self._thread.start()
        if not self._started.wait(timeout):
            raise EdgeopsError(f"embedded broker did not start listening on {self.host}:{self.port}")
        if self._error is not None:
            raise EdgeopsError(f"embedded broker failed to start on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from amqtt.broker import Broker

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            broker = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })
            await broker.start()
            self._started.set()
            await self._stop.wait()
            await broker.shutdown()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start() or logged: the thread must not die silently
            self._error = exc
            log.error("embedded broker stopped: %s", exc)
        finally:
            self._started.set()
