"""Rollout admission: the in-flight bound that keeps generated sequences within ``max_policy_lag``."""

import pytest

from learner.admission import RolloutAdmission


def test_grants_in_request_order_up_to_the_limit():
    admission = RolloutAdmission(limit=16)
    for actor in (b"a", b"b", b"c"):
        admission.request(actor, 8)
    assert admission.grants(buffered=0) == [b"a", b"b"]
    assert admission.outstanding == 16 and admission.grants(buffered=0) == []
    admission.received(b"a", 8)  # arrived, now waiting in the buffer: still counts
    assert admission.grants(buffered=8) == []
    assert admission.grants(buffered=0) == [b"c"]  # the learner took it


def test_one_batch_is_always_allowed_when_nothing_is_in_flight():
    admission = RolloutAdmission(limit=4)
    admission.request(b"a", 8)
    assert admission.grants(buffered=0) == [b"a"]
    admission.request(b"b", 8)
    assert admission.grants(buffered=0) == []


def test_a_repeated_request_queues_once_and_forget_releases_grants():
    admission = RolloutAdmission(limit=8)
    admission.request(b"a", 8)
    assert admission.grants(buffered=0) == [b"a"]
    admission.request(b"b", 8)
    admission.request(b"b", 8)
    assert len(admission.waiting) == 1
    admission.forget(b"a")  # a rejoined: its grant will never arrive
    assert admission.grants(buffered=0) == [b"b"]
    admission.received(b"b", 100)  # more than granted (a resent batch): never negative
    assert admission.outstanding == 0


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError):
        RolloutAdmission(limit=0)


def test_groups_dropped_on_arrival_never_stall_the_run():
    """Batch 16, limit 16, two actors of 8: half of a's batch is dropped on arrival (dynamic sampling). With
    12 sequences buffered the learner cannot train; the limit alone would grant nothing more, forever."""
    admission = RolloutAdmission(limit=16, needed=16)
    for actor in (b"a", b"b"):
        admission.request(actor, 8)
    assert admission.grants(buffered=0) == [b"a", b"b"]
    admission.received(b"a", 8)  # 4 accepted, 4 dropped
    admission.request(b"a", 8)
    assert admission.grants(buffered=4) == [b"a"]  # 8 in flight + 4 buffered < 16: it cannot fill a batch
    admission.received(b"b", 8)
    admission.request(b"b", 8)
    assert admission.grants(buffered=12) == []  # a's 8 in flight will fill it: the limit holds again
