"""Where each shared-prefix group's requests went, per stage and routing setup, on the gpt-oss-20b profiles
(docs/simulator.md, "Precise vs approximate routing on a hybrid model"). Virtual time, same workload and seed as
the bench. Usage: python benchmarks/hybrid/group_spread.py {hybrid|nohybrid} KV_BLOCKS SEED
"""
import collections, sys
from extproc.bench import virtual
from extproc.bench.setups import SETUPS
from extproc.bench.workloads import Stage, generate
layout, kv, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
wl = generate("shared-prefix", [Stage(80, 15), Stage(120, 15), Stage(160, 15)], seed=seed)
fl = virtual.layout(f"models/sim-profiles/gpt-oss-20b-h100-{layout}.yaml:8", kv_blocks=kv)
for setup in ("extproc-prefix-load", "extproc-precise"):
    res = virtual.run_virtual(wl, SETUPS[setup], fl, seed=seed)
    by = {r.index: r for r in res.results}
    for stage in (0, 1, 2):
        pods = collections.defaultdict(collections.Counter)
        for q in wl.requests:
            r = by[q.index]
            if q.stage == stage and r.ok:
                pods[q.group][r.pod] += 1
        distinct = sum(len(c) for c in pods.values()) / len(pods)
        top = sum(max(c.values()) for c in pods.values()) / sum(sum(c.values()) for c in pods.values())
        print(f"{layout} {kv} seed {seed} {setup:20s} stage {stage}: pods per group {distinct:.2f}, share on the group's top pod {top:.1%}")
    for stage in (2,):
        per = collections.Counter(by[q.index].pod for q in wl.requests if q.stage == stage and by[q.index].ok)
        groups = collections.defaultdict(set)
        for q in wl.requests:
            if q.stage == stage:
                groups[by[q.index].pod].add(q.group)
        v = sorted(per.values())
        print(f"   {setup} stage 2 requests per pod min/max {v[0]}/{v[-1]} (mean {sum(v)/len(v):.0f}); groups per pod {sorted(len(g) for g in groups.values())}")
