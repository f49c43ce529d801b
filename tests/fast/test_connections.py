"""The HTTP connection cap's choices (edge/http/connections.py Admission), without a server: who is displaced when
places run short, who is let in for /health alone, and who is closed."""

from __future__ import annotations

from jachat.service.edge.http.connections import Admission, Connection


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admit(admission: Admission, peer: str, closed: list[str], name: str) -> Connection | None:
    return admission.admit(peer, lambda: closed.append(name))


def test_a_newcomer_displaces_the_connection_that_sent_the_fewest_bytes_a_second() -> None:
    clock, closed = Clock(), list[str]()
    admission = Admission(3, per_peer=3, clock=clock)
    fast, slow, idle = (admit(admission, "10.0.0.1", closed, n) for n in ("fast", "slow", "idle"))
    assert fast and slow and idle
    clock.now += 10
    fast.received, slow.received, idle.received = 50_000, 40, 0
    idle.answering = 1  # its body is in and it is being answered: never displaced
    newcomer = admit(admission, "10.0.0.2", closed, "new")
    assert newcomer is not None and not newcomer.probe
    assert closed == ["slow"] and admission.displaced == 1
    assert slow not in admission.open and newcomer in admission.open
    admission.release(slow)  # its connection_lost comes later: nothing is released twice
    assert len(admission.open) == 3 and admission.by_peer == {"10.0.0.1": 2, "10.0.0.2": 1}


def test_a_peer_at_its_share_displaces_its_own_slowest_connection_only() -> None:
    clock, closed = Clock(), list[str]()
    admission = Admission(10, per_peer=2, clock=clock)
    other = admit(admission, "10.0.0.9", closed, "other")
    mine = [admit(admission, "10.0.0.1", closed, f"mine{i}") for i in range(2)]
    clock.now += 5
    assert other is not None and all(mine)
    assert admit(admission, "10.0.0.1", closed, "third") is not None
    assert closed == ["mine0"]  # the peer's own oldest idle one; the other peer's is untouched
    assert admission.by_peer == {"10.0.0.9": 1, "10.0.0.1": 2}


def test_when_every_place_is_answered_newcomers_get_probe_places_and_then_nothing() -> None:
    closed: list[str] = []
    admission = Admission(2, per_peer=2, probes=16)
    for connection in (admit(admission, "10.0.0.1", closed, n) for n in "ab"):
        assert connection is not None
        connection.answering = 1
    probes = [admit(admission, "10.0.0.2", closed, f"probe{i}") for i in range(3)]
    assert [p is not None and p.probe for p in probes] == [True, True, False]  # two per peer (16 // 8)
    assert admit(admission, "10.0.0.3", closed, "elsewhere") is not None
    assert closed == [] and len(admission.open) == 2
    first = probes[0]
    assert first is not None
    admission.release(first)
    assert admission.probing == 2 and admission.probing_by_peer == {"10.0.0.2": 1, "10.0.0.3": 1}


def test_the_per_peer_share_defaults_to_a_quarter_of_the_cap() -> None:
    assert Admission(1024).per_peer == 256
    assert Admission(1024, per_peer=0).per_peer == 256
    assert Admission(1024, per_peer=900).per_peer == 900


def test_a_connection_too_young_to_have_sent_its_request_goes_last() -> None:
    clock, closed = Clock(), list[str]()
    admission = Admission(2, per_peer=2, clock=clock)
    old = admit(admission, "10.0.0.1", closed, "old")
    assert old is not None
    clock.now += 30
    old.received = 600  # 20 bytes a second: a trickle, yet more than the newcomer's nothing
    assert admit(admission, "10.0.0.1", closed, "young") is not None
    assert admit(admission, "10.0.0.1", closed, "next") is not None
    assert closed == ["old"]  # not the young one, which has sent nothing yet
