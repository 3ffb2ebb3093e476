"""The control channel of the socket-controlled transports ("nccl"/"gloo", "cuda_ipc"): length-prefixed
`KVControl` protobuf frames (kv_transfer.proto) over one TCP connection per pair.

The receiver runs a `ControlListener` (port 0: the OS picks it; it is the endpoint's port) that serves every
accepted connection on a thread of its own. The sender holds one `ControlConn` per receiver. A timed-out or
broken connection is never reused (the caller drops it and pairs again). Unlike a TCPStore, a message costs
one syscall each way and no helper threads, so a handoff's control traffic stays in the tens of microseconds.

With the cluster secret, a connection starts with a mutual hello before any other message: the listener
sends a fresh nonce, the sender answers with its HMAC under the secret and a nonce of its own, the listener
answers that one's HMAC (`cluster.secret.mac`). A side that fails to prove it knows the secret is dropped at
once, so neither a stranger's sender nor a stranger's listener ever sees a control message.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from cluster.secret import mac, same
from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.api import TransportError, format_endpoint, parse_endpoint, time_left

log = logging.getLogger(__name__)
_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 1 << 26
_SEND_TIMEOUT_S = 30.0  # messages are tiny: a send only blocks if the peer stopped reading altogether
_HELLO_TIMEOUT_S = 5.0  # each step of the hello; a peer that does not know the protocol fails within it
_PR_SET_TIMERSLACK = 29
_FINE_SLACK_NS = 1000


def fine_timer_slack() -> None:
    """Let the calling thread's short sleeps end on time (Linux; a per-thread setting): the default 50 us
    timer slack turns a 20 us poll gap into about 100 us, which a handoff of about a ms pays at its end. For
    the threads that poll CUDA events or spin for a reply. No-op elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, _FINE_SLACK_NS, 0, 0, 0)


class ControlConn:
    """One control connection. `send` is thread-safe; `recv` must be called by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_SEND_TIMEOUT_S)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def connect(cls, endpoint: str, timeout_s: float, secret: str = "") -> ControlConn:
        """A connection to the listener at `endpoint`; with `secret`, after the mutual hello."""
        host, port = parse_endpoint(endpoint)
        try:
            conn = cls(socket.create_connection((host, port), timeout=max(timeout_s, 0.001)))
        except OSError as e:
            raise TransportError(f"KV receiver {endpoint} unreachable: {e}") from e
        if secret:
            try:
                conn._hello_as_sender(secret, min(timeout_s, _HELLO_TIMEOUT_S))
            except (TransportError, TimeoutError, ValueError) as e:
                conn.close()
                raise TransportError(f"KV receiver {endpoint} failed the cluster hello: {e}") from None
        return conn

    def _hello_as_sender(self, secret: str, timeout_s: float) -> None:
        theirs = self._recv_hello(timeout_s).nonce
        ours = secrets.token_hex(16)
        self.send(kpb.KVControl(hello=kpb.KVHello(mac=mac(secret, "kv-ctl-sender", theirs.encode()), nonce=ours)))
        if not same(self._recv_hello(timeout_s).mac, mac(secret, "kv-ctl-receiver", ours.encode())):
            raise ValueError("the receiver does not know the cluster secret")

    def hello_as_receiver(self, secret: str) -> bool:
        """The listener's side of the hello; False (the caller drops the connection) if the peer fails it."""
        ours = secrets.token_hex(16)
        try:
            self.send(kpb.KVControl(hello=kpb.KVHello(nonce=ours)))
            reply = self._recv_hello(_HELLO_TIMEOUT_S)
            if not same(reply.mac, mac(secret, "kv-ctl-sender", ours.encode())):
                return False
            self.send(kpb.KVControl(hello=kpb.KVHello(mac=mac(secret, "kv-ctl-receiver", reply.nonce.encode()))))
        except (TransportError, TimeoutError, ValueError):
            return False
        return True

    def _recv_hello(self, timeout_s: float) -> kpb.KVHello:
        msg = self.recv(timeout_s)
        if msg.WhichOneof("kind") != "hello":
            raise ValueError("the peer does not speak the cluster hello")
        return msg.hello

    def send(self, msg: kpb.KVControl) -> None:
        data = msg.SerializeToString()
        try:
            with self._send_lock:
                self._sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as e:
            raise TransportError(f"control connection lost: {e}") from e

    def recv(self, timeout_s: float | None, spin_s: float = 0.0) -> kpb.KVControl:
        """The next message; TimeoutError after `timeout_s` (None: wait forever), TransportError on EOF or an
        undecodable frame. `spin_s`: poll without sleeping for that long first, for a reply due any moment (a
        thread that sleeps in select() can take 0.1 ms or more to wake on an idle host)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        header = self._read(_HEADER.size, deadline, time.monotonic() + spin_s if spin_s > 0 else 0.0)
        (size,) = _HEADER.unpack(header)
        if size > _MAX_MESSAGE:
            raise TransportError(f"control message of {size} bytes: the peer is out of step")
        try:
            return kpb.KVControl.FromString(self._read(size, deadline))
        except DecodeError as e:
            raise TransportError(f"undecodable control message: {e}") from None

    def _read(self, n: int, deadline: float | None, spin_until: float = 0.0) -> bytes:
        while len(self._buf) < n:
            now = time.monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                raise TimeoutError("no control message in time")
            if now < spin_until:
                left = 0.0  # a poll; select releases the GIL for it
            try:
                ready, _, _ = select.select([self._sock], [], [], left)
                if not ready:
                    continue
                chunk = self._sock.recv(1 << 16)
            except (OSError, ValueError) as e:  # ValueError: the socket was closed under us
                raise TransportError(f"control connection lost: {e}") from e
            if not chunk:
                raise TransportError("control connection closed by the peer")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


def open_pair(endpoint: str, deadline: float, secret: str, request: kpb.KVControl,
              answer: str) -> tuple[ControlConn, kpb.KVControl]:
    """A sender's new connection to the receiver at `endpoint`: the hello, `request` out, the receiver's message
    of kind `answer` back, by `deadline`. The caller owns the connection (and closes it if what follows fails)."""
    ctl = ControlConn.connect(endpoint, time_left(deadline), secret)
    try:
        ctl.send(request)
        try:
            msg = ctl.recv(time_left(deadline))
        except TimeoutError:
            raise TransportError(f"KV receiver {endpoint} did not answer the pairing") from None
        if msg.WhichOneof("kind") != answer:
            raise TransportError(f"KV receiver {endpoint} answered the pairing with {msg.WhichOneof('kind')}, "
                                 f"not {answer}: another transport?")
    except BaseException:
        ctl.close()
        raise
    return ctl, msg


class ControlListener:
    """Receiver side: accepts control connections and runs `handler(conn)` for each on a thread of its own
    (with `secret`, only for those that pass the hello). The handler thread polls with fine timer slack."""

    def __init__(self, host: str, handler: Callable[[ControlConn], None], name: str, secret: str = "") -> None:
        self._secret = secret
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, 0), family=family, backlog=64)
        self.endpoint = format_endpoint(host, self._sock.getsockname()[1])
        self._handler = handler
        self._name = name
        self._lock = threading.Lock()
        self._conns: set[ControlConn] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn = ControlConn(sock)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                t = threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-pair", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: ControlConn) -> None:
        fine_timer_slack()
        try:
            if self._secret and not conn.hello_as_receiver(self._secret):
                log.warning("KV control connection refused: the peer does not know the cluster secret")
                return
            self._handler(conn)
        except Exception:
            log.exception("KV control connection handler failed")
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop accepting, close every connection (their handlers see EOF) and wait for the handlers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, threads = list(self._conns), list(self._threads)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for c in conns:
            c.close()
        deadline = time.monotonic() + wait_s
        for t in [self._accept, *threads]:
            t.join(max(deadline - time.monotonic(), 0.0))
