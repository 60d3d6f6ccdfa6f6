"""The gossip node's settings and the values it hands its caller.

``GossipConfig`` holds every timer and bound of ``GossipNode`` (``gossip.py``);
``Send`` and ``Notice`` are what the node returns to the caller, and ``Stats``
its counters.  Kept apart from the state machine so the caller (the daemon,
``sim``) can read the settings without the machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .membership import SuspicionConfig
from .wire import Envelope

__all__ = ["GossipConfig", "Notice", "Send", "Stats"]


@dataclass(frozen=True, slots=True)
class GossipConfig:
    cluster: str = "meshnode"
    gossip_interval_s: float = 0.5
    fanout: int = 2
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: float = 3.0
    suspicion_max_mult: float = 6.0
    retransmit_mult: int = 4
    piggyback_max: int = 16
    # One random dead member is re-dialled this often: what finds the other side
    # when a partition heals (first contact in about redial_interval_s / side size).
    redial_interval_s: float = 1.0
    reap_after_s: float = 3600.0
    tombstone_grace_s: float = 3600.0
    delta_budget_bytes: int = 256 * 1024
    relays_max: int = 1024
    housekeeping_interval_s: float = 5.0
    health_max: int = 8
    # Lifeguard's local health, for suspicions: a tick later than its deadline
    # by more than ``late_after_s`` (our process was starved) raises ``lag``,
    # up to ``lag_max``, and each probe interval on time lowers it; suspicion
    # timeouts are stretched by (1 + lag), and the probe out gets back the time
    # we lost, so a slow host doubts itself before it accuses others.
    late_after_s: float = 0.25
    lag_max: int = 4
    # Member lists in anti-entropy: the records changed lately (at most
    # ``member_recent_max``), and the whole list with probability
    # member_recent_max / N, so that churn from false suspicions at scale
    # costs about the same bytes per exchange at any N, not O(N).  Small
    # tables always go whole.
    member_recent_s: float = 10.0
    member_recent_max: int = 32
    # Generations are wall-clock ms: one further ahead of ours than this is refused.
    generation_ahead_max_ms: int = 60_000
    # An identity conflict moves our generation at most this often.
    identity_refute_interval_s: float = 5.0
    # A sync cut by the budget resumes at once: the receiver asks again with
    # its new digest while each answer brings it something.  Meanwhile the two
    # open no other sync with each other (it would carry the same keys) for
    # this long after the last step.
    pull_hold_s: float = 1.0
    # Steady gossip carries what changed: a node whose catalog changed opens
    # its round's syncs with the digest entries of the origins that changed,
    # each named ``retransmit_mult * ceil(log10(N + 1))`` times (as a rumour
    # is), at most ``changes_recent_max`` a sync; a node whose members
    # changed in the last ``changes_recent_s`` syncs with ``fanout`` peers
    # too; one with nothing new opens ``idle_sync_fanout``.  A full sync
    # (every digest entry, if the hashes differ) goes to one random peer every
    # ``full_sync_interval_s``, scaled with N as memberlist's push-pull is
    # (x ceil(log2(N / 32)) + 1 above 32 members), and to seeds and the dead.
    changes_recent_s: float = 2.0
    changes_recent_max: int = 32
    full_sync_interval_s: float = 10.0
    # A node with nothing new still opens this many syncs a round (the pull
    # half of push-pull: a peer answers with what changed at it lately).
    idle_sync_fanout: int = 1

    def __post_init__(self) -> None:
        assert self.gossip_interval_s > 0 and self.probe_interval_s > 0
        assert 0 < self.probe_timeout_s < self.probe_interval_s
        assert self.fanout >= 1 and self.indirect_checks >= 0
        assert self.delta_budget_bytes >= 1024

    def suspicion(self) -> SuspicionConfig:
        return SuspicionConfig(
            probe_interval_s=self.probe_interval_s,
            suspicion_mult=self.suspicion_mult,
            suspicion_max_mult=self.suspicion_max_mult,
            expected_confirmations=self.indirect_checks,
        )


@dataclass(frozen=True, slots=True)
class Send:
    to: str  # peer address
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Notice:
    """Something an operator should hear about (the daemon logs it at WARNING)."""

    kind: str  # "identity_conflict", "future_generation"
    text: str


@dataclass(slots=True)
class Stats:
    messages_in: int = 0
    messages_out: int = 0
    suspicions_raised: int = 0
    stale_accusations: int = 0
    deaths_declared: int = 0
    refutations: int = 0
    identity_conflicts: int = 0
    generation_moves: int = 0
    future_generations_dropped: int = 0
    syncs_in_agreement: int = 0
    late_ticks: int = 0  # ticks later than our own deadline by more than ``late_after_s``
    gossip_rounds: int = 0
    counters: dict[str, int] = field(default_factory=dict)
