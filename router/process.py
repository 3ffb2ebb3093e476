"""A router in a child process: the same `serve(RouterConfig)` as the in-process one, so every listener that
`serve()` starts comes along; several of them share one port through SO_REUSEPORT (`RouterConfig.reuse_port`).

The child never outlives its launcher: it watches its end of a pipe to the parent, which reads as closed the
moment the parent exits for any reason, and then stops. SIGINT is ignored there (a terminal's Ctrl-C reaches
the whole process group; the launcher stops its children itself), SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import socket
from multiprocessing.connection import Connection

from router.config import RouterConfig

log = logging.getLogger(__name__)
STOP = "stop"


def check_port_free(host: str, port: int) -> None:
    """RuntimeError if something already listens on host:port. With SO_REUSEPORT a bind would not fail there
    (a second cluster's routers would quietly share the first one's port), so look before binding."""
    if port == 0:
        return
    for family, kind, proto, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc's listener: TIME_WAIT is fine
            try:
                probe.bind(addr)
            except OSError as exc:
                raise RuntimeError(f"router cannot bind {host}:{port}: {exc.strerror}") from None


def _child_main(config: RouterConfig, conn: Connection, log_level: int, grace_s: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    asyncio.run(_serve_until_told(config, conn, grace_s))


async def _serve_until_told(config: RouterConfig, conn: Connection, grace_s: float) -> None:
    from router.server import serve

    try:
        router = await serve(config)
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which fails the cluster's start
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", router.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), stop.set)  # a STOP message, or end of file: the launcher is gone
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    loop.remove_reader(conn.fileno())
    await router.stop(grace_s)


class RouterProcess:
    """One router running in a spawned child (torch-free: it imports only `router` and what it needs)."""

    def __init__(self, config: RouterConfig, grace_s: float = 2.0) -> None:
        self.config = config
        self.grace_s = grace_s
        self.port: int | None = None
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name=f"pdserve-router-{config.port}", daemon=True,
                                 args=(config, child_conn, logging.getLogger().getEffectiveLevel(), grace_s))
        self._proc.start()
        child_conn.close()  # only the child holds its end: its death reads as end of file here

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def wait_ready(self, timeout_s: float = 60.0) -> int:
        """The bound port once the child serves; RuntimeError with the child's reason if it could not start."""
        def receive() -> tuple[str, object]:
            if not self._conn.poll(timeout_s):
                raise RuntimeError(f"router process {self.pid} did not start within {timeout_s:g}s")
            try:
                return self._conn.recv()  # type: ignore[no-any-return]
            except EOFError:
                raise RuntimeError(f"router process {self.pid} exited while starting "
                                   f"(exit code {self._proc.exitcode})") from None

        kind, value = await asyncio.to_thread(receive)
        if kind != "ready":
            raise RuntimeError(f"router process {self.pid} failed to start: {value}")
        self.port = int(value)  # type: ignore[call-overload]
        return self.port

    async def stop(self) -> None:
        """Ask the child to stop (it lets running requests finish for `grace_s`), then make sure it is gone."""
        with contextlib.suppress(OSError):
            self._conn.send(STOP)
        await asyncio.to_thread(self._proc.join, self.grace_s + 5.0)
        if self._proc.is_alive():
            log.warning("router process %s did not stop in time: killing it", self.pid)
            self._proc.kill()
            await asyncio.to_thread(self._proc.join, 5.0)
        self._conn.close()
