"""Which decoder replica serves a turn: KV affinity by rendezvous hashing, spilling when saturated.

Pure: no I/O, no clock. The live side (resolving replicas, polling their load) is
gateway/decoder_pool.py; it hands `choose` what it knows and records the outcome.

Affinity. A turn's affinity key names the prefix whose KV it wants to reuse: the session for a
session turn, else its leading image's feature key, else its leading prompt text, always inside the
tenant's cache scope (so two tenants' keys never coincide, as their prefix caches never do).
Rendezvous (highest-random-weight) hashing ranks the replicas for a key by hash(key, replica): every
gateway computes the same ranking without talking to the others, and removing a replica moves only
the keys it ranked first (each to its own second choice), adding one takes only the keys it now
ranks first. No state to share, none to rebuild.

Spill rule (the one place it is stated). A replica is saturated when a new turn would queue on it
or would squeeze the KV it came for: its sequences (running + waiting, as it last reported or as
this gateway's own open calls to it imply, whichever is more) reach `max_num_seqs + spill_queue`,
or its KV-cache use reaches `spill_kv_usage`. Why: a queued turn waits for a whole running sequence
to finish (seconds of decoding), while recomputing its prefix on another replica costs one prefill
(tens to hundreds of milliseconds); and a nearly full KV cache evicts the very prefix the turn came
for. A saturated first choice gives the turn to the least loaded healthy replica that is not
saturated; when every replica is saturated the turn stays with its affinity replica (moving would
lose the KV and still queue).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

AFFINITY_KEY_VERSION = "ivl-route-v1"


class Outcome(enum.Enum):
    """How a turn's replica was chosen (the label of the routing-decision counter)."""

    AFFINITY = "affinity"  # the key's own replica (first rendezvous choice, or where it moved before)
    SPILL = "spill"  # that replica was saturated: the least loaded one instead
    FAILOVER = "failover"  # that replica was down: the key's next rendezvous choice
    ONLY_REPLICA = "only_replica"  # one replica: nothing to choose (today's behaviour)
    NO_HEALTHY = "no_healthy"  # every replica down: tried on the key's first choice anyway


@dataclass(frozen=True)
class Load:
    """A replica's load as the gateway sees it: its last report, and this gateway's own open calls.

    A report is up to a poll old; this gateway's own calls it knows exactly. So the sequences of
    others are taken from the report (minus this gateway's calls open when it came in) and this
    gateway's are counted as they are now: a turn that just ended no longer counts, a burst this
    gateway just sent counts at once.
    """

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    max_num_seqs: int = 0  # 0 = unknown (no report yet)
    local_in_flight: int = 0  # calls this gateway has open to it now
    local_at_report: int = 0  # calls this gateway had open when the report came in

    @property
    def sequences(self) -> int:
        others = max(0, self.running + self.waiting - self.local_at_report)
        return others + self.local_in_flight

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def order(self) -> tuple[float, ...]:
        """Less is less loaded: queued work first, then KV use, then running sequences."""
        queued = max(0, self.sequences - self.max_num_seqs) if self.max_num_seqs else self.waiting
        return (queued, self.kv_usage, self.sequences)


@dataclass(frozen=True)
class SpillRule:
    """When a replica counts as saturated (see the module docstring for why)."""

    spill_queue: int = 0  # sequences that may queue on a full replica before turns spill
    spill_kv_usage: float = 0.9  # KV-cache fraction in use at which turns spill

    def __post_init__(self) -> None:
        if self.spill_queue < 0:
            raise ValueError("--route-spill-queue must be >= 0")
        if not 0.0 < self.spill_kv_usage <= 1.0:
            raise ValueError("--route-spill-kv-usage must be in (0, 1]")

    def saturated(self, load: Load) -> bool:
        if load.max_num_seqs and load.sequences >= load.max_num_seqs + self.spill_queue:
            return True
        return load.kv_blocks_total > 0 and load.kv_usage >= self.spill_kv_usage


@dataclass(frozen=True)
class ReplicaView:
    """What `choose` needs of one replica."""

    address: str
    healthy: bool
    load: Load = Load()


@dataclass(frozen=True)
class Decision:
    address: str
    outcome: Outcome


def affinity_key(scope: str, *, session_id: str = "", leading_feature_key: str = "", leading_text: str = "") -> str:
    """The key a turn is routed by: its session, else its leading image, else its leading text."""
    if session_id:
        kind, value = "session", session_id
    elif leading_feature_key:
        kind, value = "image", leading_feature_key
    else:
        kind, value = "text", leading_text
    return hashlib.sha256("\x00".join((AFFINITY_KEY_VERSION, scope, kind, value)).encode()).hexdigest()


def _weight(key: str, address: str) -> bytes:
    return hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()


def rank(key: str, addresses: Sequence[str]) -> list[str]:
    """The replicas in the key's rendezvous order (first = its affinity replica)."""
    return sorted(addresses, key=lambda a: _weight(key, a), reverse=True)


def choose(key: str, replicas: Sequence[ReplicaView], rule: SpillRule, moved_to: str = "") -> Decision:
    """The replica for a turn with this affinity key.

    `moved_to` is where this key's turns went last when that was not its rendezvous first choice
    (a spill or failover): the KV is there now, so it is the affinity replica while it is healthy.
    """
    if not replicas:
        raise ValueError("no decoder replicas to choose from")
    if len(replicas) == 1:
        return Decision(replicas[0].address, Outcome.ONLY_REPLICA)
    by_address = {r.address: r for r in replicas}
    order = rank(key, list(by_address))
    healthy = [a for a in order if by_address[a].healthy]
    if not healthy:
        return Decision(order[0], Outcome.NO_HEALTHY)
    home = moved_to if moved_to in healthy else healthy[0]
    outcome = Outcome.AFFINITY if home in (moved_to, order[0]) else Outcome.FAILOVER
    if not rule.saturated(by_address[home].load):
        return Decision(home, outcome)
    free = [a for a in healthy if not rule.saturated(by_address[a].load)]
    if not free:
        return Decision(home, outcome)
    # min() keeps the first of equals: ties go to the key's earlier rendezvous choice (stable).
    return Decision(min(free, key=lambda a: by_address[a].load.order()), Outcome.SPILL)
