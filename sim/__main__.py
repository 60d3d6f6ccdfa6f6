"""``python -m sim [run|bench|sweep|swarm|jobs|gpus|serving|replicas|eviction|routing]``: the simulator's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from .bench import BenchPlan, run_bench
from .eviction import eviction_table
from .gpus import READ_S, simulate_gpus
from .jobs import draw_jobs, sweep_jobs
from .replicas import simulate_replicas
from .report import fmt, table
from .routing import POLICIES, RoutingSpec, routing_table
from .scenarios import ChaosSpec, chaos
from .serving import HANG_TARGET_S, simulate_serving
from .swarm_tables import swarm_table, swarm_targets
from .sweep import draw, sweep


def _verdict(headline: str, found: list[str]) -> int:
    """Print ``headline`` and the first ten violations; the exit status (1 if any)."""
    print(headline)
    for v in found[:10]:
        print(f"  ! {v}")
    return 1 if found else 0


def _partition(s: str) -> tuple[float, float] | None:
    if s.lower() in ("", "none", "no"):
        return None
    a, sep, b = s.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected T1:T2 (seconds), or none")
    t1, t2 = float(a), float(b)
    if not 0 <= t1 < t2:
        raise argparse.ArgumentTypeError("need 0 <= T1 < T2")
    return (t1, t2)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="one chaos run (the default)")
    r.add_argument("--nodes", type=int, default=50)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--loss", type=float, default=0.05)
    r.add_argument("--duration", type=float, default=120.0, help="simulated seconds")
    r.add_argument("--partition", type=_partition, default=(30.0, 60.0), help="T1:T2 split at T1, heal at T2; or none")
    r.add_argument("--groups", type=int, default=2)
    r.add_argument("--crashes", type=int, default=2)
    r.add_argument("--restarts", type=int, default=1)
    r.add_argument("--leaves", type=int, default=1)
    r.add_argument("--models", type=int, default=6)
    r.add_argument("--conflicts", type=int, default=2)
    r.add_argument("--skew", type=float, default=0.5, help="max clock skew per node, seconds")
    r.add_argument("--delay", type=float, default=0.004, help="mean delay jitter, seconds")
    r.add_argument("--quiet", type=float, default=40.0, help="fault-free seconds at the end")
    r.add_argument("--cold", action="store_true", help="nodes boot and join through the seeds")
    r.add_argument("--wire", action="store_true", help="round-trip every message through encode/decode")
    r.add_argument("--json", action="store_true")
    b = sub.add_parser("bench", help="the protocol's targets")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--processes", type=int, default=0)
    b.add_argument("--spread-seeds", type=int, default=None)
    b.add_argument("--fd-duration", type=float, default=None, help="simulated s for the N=1000 false-death run")
    jb = sub.add_parser("jobs", help="pipelines with no head under crashes and partitions; invariants per seed")
    jb.add_argument("--seeds", type=int, default=200)
    jb.add_argument("--start", type=int, default=1)
    jb.add_argument("--processes", type=int, default=0, help="0: one per CPU")
    sw = sub.add_parser("sweep", help="many seeded chaos runs over random parameters; violations by kind")
    sw.add_argument("--seeds", type=int, default=1000, help="how many seeds (10000 for the long run)")
    sw.add_argument("--start", type=int, default=1, help="the first seed")
    sw.add_argument("--processes", type=int, default=0, help="0: one per CPU")
    g = sub.add_parser("gpus", help="GPU load in the catalog: writes and bytes under the publish rule vs every read")
    g.add_argument("--nodes", type=int, default=50)
    g.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    g.add_argument("--hours", type=float, default=1.0, help="simulated hours")
    g.add_argument("--seed", type=int, default=1)
    sv = sub.add_parser("serving", help="engines that crash and hang, under the daemon's service state machine")
    sv.add_argument("--services", type=int, default=200)
    sv.add_argument("--hours", type=float, default=6.0, help="simulated hours")
    sv.add_argument("--seed", type=int, default=1)
    rp = sub.add_parser("replicas", help="the replica rule on every node alone: crashes, a partition, nodes joining")
    rp.add_argument("--seeds", type=int, default=5)
    rp.add_argument("--nodes", type=int, default=20)
    rp.add_argument("--models", type=int, default=30)
    ev = sub.add_parser("eviction", help="one tier under a stream of reads: the eviction rule (LRU) against random")
    ev.add_argument("--seeds", type=int, default=5)
    ro = sub.add_parser("routing", help="inference routed by every node alone on stale load: affinity, load, round-robin")
    ro.add_argument("--nodes", type=int, default=8)
    ro.add_argument("--services", type=int, default=4)
    ro.add_argument("--prompts", type=int, default=8)
    ro.add_argument("--rate", type=float, default=6.0, help="requests per second, all nodes together")
    ro.add_argument("--duration", type=float, default=600.0, help="simulated seconds")
    ro.add_argument("--seed", type=int, default=1)
    w = sub.add_parser("swarm", help="one seed, N receivers: the daemon's pull policy against the star")
    w.add_argument("--receivers", type=_sizes, default=[2, 6, 24, 100], help="comma-separated swarm sizes")
    w.add_argument("--chunks", type=int, default=256)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--targets", action="store_true",
                   help="issue 26's targets instead (100 and --big receivers, slow, dying and late receivers, "
                        "two seeds, racks, the control plane): each MET or MISSED; minutes")
    w.add_argument("--big", type=int, default=1000, help="the large swarm of --targets")
    return p


def _sizes(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 2,6,24: {s!r}") from None
    if not out or any(not 1 <= n <= 1000 for n in out):
        raise argparse.ArgumentTypeError("each size must be in [1, 1000]")
    return out


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 1 <= args.seeds <= 1_000_000:
        parser.error("--seeds must be in [1, 1000000]")
    t = time.perf_counter()
    res = sweep(range(args.start, args.start + args.seeds), processes=args.processes)
    print(f"sim sweep: {args.seeds} seeds from {args.start}, {time.perf_counter() - t:.0f} s; "
          f"runs with violations: {len(res.failed)}; leaves no peer could hear (cut off, so seen dead): "
          f"{res.leaves_unheard}")
    kinds = ["left seen as not left", "lost registration", "catalogs differ", "model views differ",
             "live node unknown or dead", "stale digest", "false death", "crash not detected", "other"]
    print(table(["violation", "runs"], [[k, str(res.by_kind.get(k, 0))] for k in kinds]))
    for seed in sorted(res.failed)[:20]:
        print(f"  seed {seed}: {draw(seed)}")
        for v in res.failed[seed][:3]:
            print(f"    ! {v}")
    return 1 if res.failed else 0


def _jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 1 <= args.seeds <= 1_000_000:
        parser.error("--seeds must be in [1, 1000000]")
    t = time.perf_counter()
    ran = sweep_jobs(range(args.start, args.start + args.seeds), processes=args.processes)
    outs = list(ran.values())
    bad = {s: o.violations for s, o in ran.items() if o.violations}
    print(f"sim jobs: {args.seeds} seeds from {args.start} (3-12 nodes, 1-8 random pipelines, up to 3 crashes, "
          f"a partition in 6 of 10), {time.perf_counter() - t:.0f} s")
    rows = [
        ["jobs that ended, all live nodes agreeing", str(sum(o.ended for o in outs))],
        ["  of which completed", str(sum(o.completed for o in outs))],
        ["  of which failed (a step failed, or its node stayed away)", str(sum(o.failed for o in outs))],
        ["  failed first with NODE_UNAVAILABLE", str(sum(o.node_unavailable for o in outs))],
        ["parts run", str(sum(o.parts_run for o in outs))],
        ["health checks run on both sides of a partition", str(sum(o.health_checks_twice for o in outs))],
        ["runs with violations", str(len(bad))],
    ]
    print(table(["measure", "count"], rows))
    for seed in sorted(bad)[:20]:
        print(f"  seed {seed}: {draw_jobs(seed)}")
        for v in bad[seed][:3]:
            print(f"    ! {v}")
    return 1 if bad else 0


def _gpus(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not (1 <= args.nodes <= 10_000 and 1 <= args.gpus <= 64 and 0 < args.hours <= 24):
        parser.error("--nodes 1 to 10000, --gpus 1 to 64, --hours up to 24")
    g = simulate_gpus(args.nodes, args.gpus, args.seed, args.hours)
    per_min = g.nodes * g.minutes
    print(f"sim gpus: {g.nodes} nodes x {g.gpus_per_node} GPUs, read every {READ_S:g} s for "
          f"{args.hours:g} h; {g.engine_changes} engine starts and stops")
    print(table(["policy", "writes / node / min", "bytes / node / min", "vs every read"], [
        ["write every read", f"{g.reads / per_min:.1f}", f"{g.bytes_every_read / per_min:.0f}", "1.00x"],
        ["publish_reason (the daemon's rule)", f"{g.writes / per_min:.2f}", f"{g.bytes_written / per_min:.0f}",
         f"{g.bytes_written / g.bytes_every_read:.2f}x"],
    ]))
    return _verdict(f"published figures beyond a threshold of the truth, or an engine change late: "
                    f"{len(g.violations)}", g.violations)


def _serving(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not (1 <= args.services <= 100_000 and 0 < args.hours <= 240):
        parser.error("--services 1 to 100000, --hours up to 240")
    sr = simulate_serving(args.services, args.hours, args.seed)
    hs, cs = sorted(sr.hangs_caught_s), sr.crashes_caught_s

    def p(xs: list[float], q: float) -> str:
        return f"{xs[min(int(q * len(xs)), len(xs) - 1)]:.1f}" if xs else "-"

    print(f"sim serving: {sr.services} services for {args.hours:g} h, a crash every 3 h and a hang every 6 h "
          "on average each; probes every 3 s, 3 failures kill, backoff 10 s doubling to 300 s")
    print(table(["measure", "value", "target"], [
        ["hangs caught, p50 / max s", f"{p(hs, 0.5)} / {p(hs, 1.0)} ({len(hs)} hangs)", f"<= {HANG_TARGET_S:g} s"],
        ["crashes caught, max s", f"{max(cs, default=0):.1f} ({len(cs)} crashes)", "at once (the process exits)"],
        ["restarts", str(sr.restarts), ""],
        ["services given up (5 crashes in 10 min)", str(sr.given_up), ""],
        ["availability (time healthy)", f"{sr.availability * 100:.2f}%", ""],
    ]))
    return _verdict(f"violations: {len(sr.violations)}", sr.violations)


def _replicas(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not (1 <= args.seeds <= 10_000 and 3 <= args.nodes <= 500 and 1 <= args.models <= 1000):
        parser.error("--seeds 1 to 10000, --nodes 3 to 500, --models 1 to 1000")
    t = time.perf_counter()
    runs = [simulate_replicas(args.nodes, args.models, seed) for seed in range(1, args.seeds + 1)]
    print(f"sim replicas: {args.seeds} seeds, {args.nodes} nodes (+4 joining at 250 s), {args.models} models "
          f"with random policies, 600 s each: a third of the holders crash at 60 s (half back in 10 s), "
          f"a partition from 120 s to 200 s; {time.perf_counter() - t:.0f} s")
    print(table(["measure", "value", "target"], [
        ["copies started / dropped", f"{sum(r.copies_started for r in runs)} / "
                                     f"{sum(r.copies_dropped for r in runs)}", ""],
        ["copies that found no source", str(sum(r.copies_failed for r in runs)), ""],
        ["models lost with every holder (nothing to copy from)", str(sum(r.lost_models for r in runs)), ""],
        ["starts beyond the rule's gap (one view)", str(sum(r.over_started for r in runs)), "0"],
        ["flaps (add, drop, add)", str(sum(r.flaps for r in runs)), "0"],
        ["models outside [min, max] at the end", str(sum(len(r.violations) for r in runs)
                                                  - sum(r.flaps + r.over_started + r.spread_unmet for r in runs)),
         "0"],
        ["spread models in fewer zones than they may, at the end",
         f"{sum(r.spread_unmet for r in runs)} of {sum(r.spread_models for r in runs)}", "0"],
    ]))
    found = [v for r in runs for v in r.violations]
    return _verdict(f"violations: {len(found)}", found)


def _eviction(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 1 <= args.seeds <= 1000:
        parser.error("--seeds 1 to 1000")
    t = time.perf_counter()
    rows, found = eviction_table(args.seeds)
    print(f"sim eviction: {args.seeds} seeds, 200 models of 1 to 20 units on a tier of 600, 10,000 Zipf reads "
          f"whose hot set moves, 4 pinned, 3 served at a time, another tenant's files; watermarks 85/70%; "
          f"{time.perf_counter() - t:.0f} s")
    print(table(["measure", "LRU (the rule)", "random order"], rows))
    return _verdict(f"violations: {len(found)}", found)


def _routing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not (1 <= args.services <= args.nodes <= 1000 and 1 <= args.prompts <= 100 and 0 < args.rate <= 1000
            and 10 <= args.duration <= 36_000):
        parser.error("--services 1 to --nodes, --nodes up to 1000, --prompts 1 to 100, --rate up to 1000, "
                     "--duration 10 to 36000")
    rspec = RoutingSpec(nodes=args.nodes, services=args.services, prompts=args.prompts, rate=args.rate,
                        duration_s=args.duration, seed=args.seed, kill_at_s=args.duration / 2)
    rows, rruns = routing_table(rspec)
    print(f"sim routing: {rspec.nodes} nodes, {rspec.services} services of one model ({rspec.slots} slots, a cache of "
          f"{rspec.cache_prompts} prefixes each), {rspec.rate:g} requests/s over {rspec.prompts} long prompts "
          f"(Zipf {rspec.zipf:g}) and {rspec.short_share:.0%} short ones, {args.duration:g} s; load published every "
          f"{rspec.publish_s:g} s, gossiped within {rspec.gossip_s:g} s; one service dies at {rspec.kill_at_s:g} s")
    print(table(["measure", *POLICIES], rows))
    found = rruns[0].violations
    return _verdict(f"Every node routes alike: {'yes' if not found else 'NO'}; violations: {len(found)}", found)


def _swarm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 1 <= args.chunks <= 4096:
        parser.error("--chunks must be in [1, 4096]")
    if args.targets:
        if not 2 <= args.big <= 5000:
            parser.error("--big must be in [2, 5000]")
        print("sim swarm --targets: 256 chunks of 1 MiB, links of 100 Mbit/s each way, the daemon's policy; "
              "max-min shared links, records gossiped in 1 s, a dead node noticed in 10 s", flush=True)
        goals = swarm_targets(seed=args.seed, big=args.big, progress=lambda name, r: print(
            f"  {name}: slowest {r.last_s / r.s_over_b:.3f} x S/B, seed sent {r.seed_sent / r.size:.3f} x S, "
            f"{r.wall_s:.0f} s of wall time", flush=True))
        print(table(["target", "measured", "limit", ""], [g.row() for g in goals]))
        print(f"targets missed: {sum(not g.met for g in goals)} of {len(goals)}")
        return 0
    rows = swarm_table(args.receivers, chunks=args.chunks, seed=args.seed)
    print(f"sim swarm: 1 seed, {args.chunks} chunks of 1 MiB, every link 100 Mbit/s each way; "
          "times against S/B (one receiver's own link)")
    print(table(rows[0], rows[1:]))
    return 0


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    plan = BenchPlan.quick() if args.quick else BenchPlan()
    kw: dict[str, object] = {"processes": args.processes}
    if args.spread_seeds is not None:
        kw["spread_seeds"] = args.spread_seeds
    if args.fd_duration is not None and not args.quick:
        kw["fd_duration_s"] = (plan.fd_duration_s[0], args.fd_duration)
    plan = replace(plan, **kw)  # type: ignore[arg-type]
    missed = run_bench(plan)
    return 1 if missed else 0


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.duration > args.quiet > 0:
        parser.error(f"--duration ({args.duration:g} s) must be longer than --quiet ({args.quiet:g} s), which must be > 0")
    if args.partition is not None and args.partition[1] > args.duration - args.quiet:
        parser.error(
            f"--partition heals at {args.partition[1]:g} s, after the faults end at "
            f"--duration - --quiet = {args.duration - args.quiet:g} s"
        )
    spec = ChaosSpec(
        nodes=args.nodes, seed=args.seed, loss=args.loss, duration_s=args.duration,
        partition=args.partition, groups=args.groups, crashes=args.crashes,
        restarts=args.restarts, leaves=args.leaves, models=args.models,
        conflicts=args.conflicts, skew_max_s=args.skew, delay_jitter_s=args.delay,
        quiet_s=args.quiet, cold=args.cold, wire=args.wire,
    )
    t = time.perf_counter()
    out = chaos(spec)
    wall = time.perf_counter() - t
    if args.json:
        print(json.dumps({"trace_hash": out.trace_hash, "violations": out.violations, **out.metrics,
                          "wall_s": wall}, default=str))
    else:
        print(f"sim run: {spec}")
        for k, v in out.metrics.items():
            print(f"  {k:32} {fmt(v, 2) if isinstance(v, float) else v}")
        print(f"  {'wall_s':32} {wall:.1f}")
        print(f"trace hash: {out.trace_hash}")
        print(f"invariants: {'OK' if not out.violations else f'{len(out.violations)} VIOLATED'}")
        for v in out.violations[:20]:
            print(f"  ! {v}")
    return 1 if out.violations else 0


# One function per subcommand: each checks its own arguments (parser.error exits), runs, prints, and returns the exit code.
_COMMANDS: dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], int]] = {
    "run": _run, "bench": _bench, "sweep": _sweep, "swarm": _swarm, "jobs": _jobs, "gpus": _gpus,
    "serving": _serving, "replicas": _replicas, "eviction": _eviction, "routing": _routing,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*_COMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # `python -m sim [options]` is `python -m sim run [options]`
    parser = _parser()
    args = parser.parse_args(argv)
    return _COMMANDS[args.cmd](args, parser)

if __name__ == "__main__":
    sys.exit(main())
