"""fastbp.distributed's collective timeout, without MPI: the polling and the notice exchange of _Collectives
driven through a stand-in communicator (the real thing, a SIGSTOPped rank in a 3-rank job, is in
tests/mpi/test_resilience.py)."""
import time

import numpy as np
import pytest

from fastbp import distributed
from fastbp.distributed import CollectiveTimeoutError, _Collectives


class _FakeMPI:
    ANY_SOURCE = -1
    IN_PLACE = object()
    SUM = object()

    class Status:
        def __init__(self):
            self.source = None

        def Get_source(self):
            return self.source


class _Request:
    """Completes ``after`` seconds after it starts (never if None); counts its polls."""

    def __init__(self, after):
        self.done_at = None if after is None else time.perf_counter() + after
        self.polls = 0

    def Test(self):
        self.polls += 1
        return self.done_at is not None and time.perf_counter() >= self.done_at

    def Wait(self):
        raise AssertionError("a timed collective must not block")


class _Comm:
    """Rank 0 of ``size``; ``answers`` maps the other ranks to the collective position each reports in its
    notice, delivered ``notice_delay`` seconds after this rank starts waiting (a rank not listed never answers)."""

    def __init__(self, size, answers, complete_after=None, notice_delay=0.0):
        self.size, self.answers, self.complete_after = size, dict(answers), complete_after
        self.notice_delay = notice_delay
        self.sent, self.started = [], None

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def Iallreduce(self, sendbuf, recvbuf, op=None):
        self.started = time.perf_counter()
        return _Request(self.complete_after)

    def Isend(self, buffer, dest, tag):
        self.sent.append((dest, tuple(buffer), tag))
        return _Request(0.0)

    def _pending(self):
        return self.started is not None and time.perf_counter() - self.started >= self.notice_delay and self.answers

    def Iprobe(self, source, tag, status=None):
        if not self._pending():
            return False
        if status is not None:
            status.source = next(iter(self.answers))
        return True

    def Recv(self, buffer, source, tag):
        buffer[:] = (source, self.answers.pop(source))


@pytest.fixture
def fake_mpi(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi", lambda: _FakeMPI)
    monkeypatch.setattr(distributed, "NOTICE_GRACE_SECONDS", 0.3)


def test_a_completed_collective_returns_without_waiting(fake_mpi):
    collectives = _Collectives(_Comm(3, {}, complete_after=0.0), timeout=5.0, on_error="raise")
    started = time.perf_counter()
    collectives.allreduce_sum(np.zeros(3), "the gradient Allreduce of optimizer step", 7)
    assert time.perf_counter() - started < 0.05


def test_a_slow_collective_is_waited_for_past_the_spin_phase(fake_mpi):
    """Completes after 0.1 s (past the 10 ms spin phase, into the sleeping polls): no error, not much later."""
    collectives = _Collectives(_Comm(3, {}, complete_after=0.1), timeout=5.0, on_error="raise")
    started = time.perf_counter()
    collectives.allreduce_sum(np.zeros(3), "an Allreduce")
    assert 0.1 <= time.perf_counter() - started < 0.1 + distributed.SLEEP_SECONDS + 0.05


def test_the_rank_that_does_not_answer_is_named(fake_mpi):
    # The collective never completes; rank 2 times out a little after this rank (its notice comes during this
    # rank's grace period), rank 1 never answers.
    comm = _Comm(3, {2: 5}, notice_delay=0.25)
    collectives = _Collectives(comm, timeout=0.2, on_error="raise")
    started = time.perf_counter()
    with pytest.raises(CollectiveTimeoutError, match=r"^rank 1 did not reach the gradient Allreduce of optimizer "
                       r"step 12 within collective_timeout=0.2 s .*\(ranks 0 and 2 waited there") as caught:
        collectives.allreduce_sum(np.zeros(3), "the gradient Allreduce of optimizer step", 12)
    seconds = time.perf_counter() - started
    assert 0.2 <= seconds < 0.2 + distributed.NOTICE_GRACE_SECONDS + 0.2
    assert caught.value.missing_ranks == (1,) and caught.value.timeout == 0.2
    assert "this rank waited 0.2 s" in str(caught.value)
    assert caught.value.operation == "the gradient Allreduce of optimizer step 12"
    # This rank told both others that it gives up, with its position in the sequence of collectives.
    assert sorted(dest for dest, _, _ in comm.sent) == [1, 2]
    assert {payload for _, payload, _ in comm.sent} == {(0, 1)}


def test_a_notice_from_another_rank_ends_the_wait_before_this_ranks_timeout(fake_mpi):
    """Rank 2 timed out first (its notice arrives after 0.05 s): this rank joins at once instead of waiting
    out its own 10 s, and names rank 1, which answered nobody."""
    comm = _Comm(3, {2: 1}, notice_delay=0.05)
    collectives = _Collectives(comm, timeout=10.0, on_error="raise")
    started = time.perf_counter()
    with pytest.raises(CollectiveTimeoutError, match="rank 1 did not reach .* when another rank's 10 s ran out"):
        collectives.allreduce_sum(np.zeros(3), "an Allreduce")
    assert time.perf_counter() - started < 0.05 + distributed.NOTICE_GRACE_SECONDS + 0.3


def test_every_rank_answering_means_the_ranks_are_in_different_collectives(fake_mpi):
    comm = _Comm(3, {1: 4, 2: 1})
    collectives = _Collectives(comm, timeout=0.1, on_error="raise")
    with pytest.raises(CollectiveTimeoutError, match=r"every rank answered: the ranks are in different collective "
                       r"operations \(rank 0 at #1, rank 1 at #4, rank 2 at #1\)") as caught:
        collectives.allreduce_sum(np.zeros(3), "an Allreduce")
    assert caught.value.missing_ranks == ()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                          ("600", TypeError), (True, TypeError)])
def test_bad_collective_timeouts_are_refused(value, error):
    with pytest.raises(error, match="collective_timeout"):
        distributed.check_collective_timeout(value)
    assert distributed.check_collective_timeout(None) is None
    assert distributed.check_collective_timeout(3) == 3.0
