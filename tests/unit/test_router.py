"""The pure routing rules (gateway/router.py) and the replica-target forms (gateway/decoder_pool.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.decoder_pool import ReplicaSource
from gateway.router import Load, Outcome, ReplicaView, SpillRule, affinity_key, choose, rank

REPLICAS = [f"10.0.0.{i}:50053" for i in range(1, 6)]
KEYS = [affinity_key("scope", session_id=f"session-{i}") for i in range(2000)]
RULE = SpillRule()
IDLE = Load(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=100, max_num_seqs=4)
FULL = Load(running=4, waiting=0, kv_blocks_used=10, kv_blocks_total=100, max_num_seqs=4)


def views(loads: dict[str, Load] | None = None, down: set[str] = frozenset()) -> list[ReplicaView]:
    loads = loads or {}
    return [ReplicaView(a, a not in down, loads.get(a, IDLE)) for a in REPLICAS]


# ------------------------------------------------------------------------------ rendezvous


def test_removing_a_replica_moves_only_its_keys_each_to_its_second_choice():
    before = {k: rank(k, REPLICAS) for k in KEYS}
    gone = REPLICAS[2]
    after = {k: rank(k, [a for a in REPLICAS if a != gone])[0] for k in KEYS}
    moved = [k for k in KEYS if before[k][0] != after[k]]
    assert moved and all(before[k][0] == gone for k in moved)
    assert all(after[k] == before[k][1] for k in moved)  # its next choice, as every gateway computes it
    assert all(after[k] == before[k][0] for k in KEYS if before[k][0] != gone)


def test_adding_a_replica_takes_only_keys_it_now_ranks_first():
    new = "10.0.0.9:50053"
    for k in KEYS:
        old, now = rank(k, REPLICAS)[0], rank(k, [*REPLICAS, new])[0]
        assert now in (old, new)


def test_ranking_ignores_the_order_replicas_are_listed_in_and_spreads_keys():
    assert all(rank(k, REPLICAS) == rank(k, list(reversed(REPLICAS))) for k in KEYS[:100])
    spread = Counter(rank(k, REPLICAS)[0] for k in KEYS)
    assert set(spread) == set(REPLICAS)
    assert min(spread.values()) > len(KEYS) / len(REPLICAS) / 2  # no replica starved


def test_affinity_keys_differ_by_tenant_scope_and_by_kind():
    assert affinity_key("a", session_id="s") != affinity_key("b", session_id="s")
    assert affinity_key("a", leading_feature_key="k") != affinity_key("b", leading_feature_key="k")
    assert affinity_key("a", leading_text="hello") != affinity_key("b", leading_text="hello")
    # A session id and an image key that happen to be equal strings are still different keys.
    assert affinity_key("a", session_id="x") != affinity_key("a", leading_feature_key="x")
    # The session wins over the leading image: every turn of a session goes one way.
    assert affinity_key("a", session_id="s", leading_feature_key="k1") == affinity_key(
        "a", session_id="s", leading_feature_key="k2")


# ------------------------------------------------------------------------------ choose


def test_a_key_goes_to_its_first_choice_when_healthy_and_not_saturated():
    for k in KEYS[:50]:
        d = choose(k, views(), RULE)
        assert (d.address, d.outcome) == (rank(k, REPLICAS)[0], Outcome.AFFINITY)


def test_one_replica_is_always_chosen_whatever_its_state():
    d = choose(KEYS[0], [ReplicaView(REPLICAS[0], False, FULL)], RULE)
    assert (d.address, d.outcome) == (REPLICAS[0], Outcome.ONLY_REPLICA)


def test_a_down_first_choice_fails_over_to_the_keys_second_choice():
    k = KEYS[0]
    first, second = rank(k, REPLICAS)[:2]
    d = choose(k, views(down={first}), RULE)
    assert (d.address, d.outcome) == (second, Outcome.FAILOVER)


def test_no_healthy_replica_still_tries_the_first_choice():
    k = KEYS[0]
    d = choose(k, views(down=set(REPLICAS)), RULE)
    assert (d.address, d.outcome) == (rank(k, REPLICAS)[0], Outcome.NO_HEALTHY)


def test_a_saturated_first_choice_spills_to_the_least_loaded_replica():
    k = KEYS[0]
    order = rank(k, REPLICAS)
    busy = Load(running=2, kv_blocks_used=30, kv_blocks_total=100, max_num_seqs=4)
    least = Load(running=1, kv_blocks_used=5, kv_blocks_total=100, max_num_seqs=4)
    loads = {order[0]: FULL, **{a: busy for a in order[1:]}, order[3]: least}
    d = choose(k, views(loads), RULE)
    assert (d.address, d.outcome) == (order[3], Outcome.SPILL)


def test_when_every_replica_is_saturated_the_turn_stays_with_its_kv():
    k = KEYS[0]
    d = choose(k, views({a: FULL for a in REPLICAS}), RULE)
    assert (d.address, d.outcome) == (rank(k, REPLICAS)[0], Outcome.AFFINITY)


def test_a_key_that_moved_stays_where_its_kv_now_is():
    k = KEYS[0]
    order = rank(k, REPLICAS)
    d = choose(k, views(), RULE, moved_to=order[2])
    assert (d.address, d.outcome) == (order[2], Outcome.AFFINITY)
    d = choose(k, views(down={order[2]}), RULE, moved_to=order[2])  # gone: back to the ranking
    assert (d.address, d.outcome) == (order[0], Outcome.AFFINITY)


def test_choose_needs_replicas():
    with pytest.raises(ValueError, match="no decoder replicas"):
        choose(KEYS[0], [], RULE)


# ------------------------------------------------------------------------------ the spill rule


@pytest.mark.parametrize(("load", "saturated"), [
    (Load(running=3, max_num_seqs=4, kv_blocks_total=100), False),
    (Load(running=4, max_num_seqs=4, kv_blocks_total=100), True),  # a new turn would queue
    (Load(running=2, waiting=2, max_num_seqs=4, kv_blocks_total=100), True),
    (Load(running=1, max_num_seqs=4, local_in_flight=3, kv_blocks_total=100), True),  # own calls, not yet reported
    # The report counted 3 of this gateway's calls that have ended since: only 1 other sequence now.
    (Load(running=4, max_num_seqs=4, local_at_report=3, kv_blocks_total=100), False),
    (Load(running=4, max_num_seqs=4, local_at_report=3, local_in_flight=3, kv_blocks_total=100), True),
    (Load(running=1, max_num_seqs=4, kv_blocks_used=89, kv_blocks_total=100), False),
    (Load(running=1, max_num_seqs=4, kv_blocks_used=90, kv_blocks_total=100), True),  # KV nearly full
    (Load(), False),  # nothing reported yet: not saturated
    (Load(local_in_flight=50), False),  # no report: its capacity is unknown
])
def test_saturation(load: Load, saturated: bool):
    assert RULE.saturated(load) is saturated


def test_spill_queue_lets_sequences_queue_before_spilling():
    rule = SpillRule(spill_queue=2)
    assert not rule.saturated(Load(running=4, waiting=1, max_num_seqs=4))
    assert rule.saturated(Load(running=4, waiting=2, max_num_seqs=4))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spill_queue": -1}, "--route-spill-queue"),
    ({"spill_kv_usage": 0.0}, "--route-spill-kv-usage"),
    ({"spill_kv_usage": 1.5}, "--route-spill-kv-usage"),
])
def test_spill_rule_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpillRule(**kwargs)


# ------------------------------------------------------------------------------ replica targets


@pytest.mark.parametrize(("target", "source"), [
    ("decoder:50053", ReplicaSource(targets=("decoder:50053",))),  # gRPC resolves it, as before
    ("10.0.0.1:1,10.0.0.2:2", ReplicaSource(targets=("10.0.0.1:1", "10.0.0.2:2"))),
    ("ipv4:10.0.0.1:1,10.0.0.2:2", ReplicaSource(targets=("ipv4:10.0.0.1:1", "ipv4:10.0.0.2:2"))),
    ("dns:///decoder-headless:50053", ReplicaSource(dns_host="decoder-headless", dns_port=50053)),
    ("dns://8.8.8.8/decoder:50053", ReplicaSource(dns_host="decoder", dns_port=50053)),
])
def test_replica_sources(target, source):
    assert ReplicaSource.parse(target) == source


@pytest.mark.parametrize("target", ["dns:///decoder", "dns:///:50053", "10.0.0.1:1,,10.0.0.2:2"])
def test_bad_replica_targets_are_refused(target):
    with pytest.raises(ValueError, match="decoder target"):
        ReplicaSource.parse(target)
