"""The paired transports' control channel on real loopback sockets: spin-then-sleep receive, fine timer slack."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest

from cluster.transport import kv_transfer_pb2 as kpb
from cluster.transport.control import ControlConn, ControlListener, fine_timer_slack


def ask(seq: int, delay_s: float) -> kpb.KVControl:
    """A message asking the echo listener to answer `seq` after `delay_s` (carried in an abort's reason)."""
    return kpb.KVControl(abort=kpb.KVAbort(seq=seq, reason=str(delay_s)))


def answer(seq: int) -> kpb.KVControl:
    return kpb.KVControl(reply=kpb.KVReply(seq=seq, status=kpb.KVReply.OK))


@pytest.fixture
def echo_pair():
    """A listener that answers each message after the delay it asks for, and a connection to it."""
    def handler(conn: ControlConn) -> None:
        while True:
            msg = conn.recv(None)
            time.sleep(float(msg.abort.reason))
            conn.send(answer(msg.abort.seq))

    listener = ControlListener("127.0.0.1", handler, "echo")
    conn = ControlConn.connect(listener.endpoint, 5.0)
    yield conn
    conn.close()
    listener.close()


@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.01])
def test_recv_with_spin_gets_replies_early_or_late(echo_pair, delay):
    # a reply inside the spin window, and one that comes after it (the receive then sleeps in select)
    for seq in range(3):
        echo_pair.send(ask(seq, delay))
        assert echo_pair.recv(5.0, spin_s=0.002) == answer(seq)


def test_recv_with_spin_still_times_out(echo_pair):
    echo_pair.send(ask(0, 0.5))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        echo_pair.recv(0.05, spin_s=0.01)
    assert time.monotonic() - t0 < 0.4
    assert echo_pair.recv(5.0) == answer(0)  # the late reply is still read whole afterwards


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is a Linux thread attribute")
def test_fine_timer_slack_applies_to_the_calling_thread_only():
    prctl = ctypes.CDLL(None).prctl
    get_slack = 30  # PR_GET_TIMERSLACK
    seen: list[int] = []

    def worker() -> None:
        fine_timer_slack()
        seen.append(prctl(get_slack, 0, 0, 0, 0))

    before = prctl(get_slack, 0, 0, 0, 0)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1000]
    assert prctl(get_slack, 0, 0, 0, 0) == before
