"""The search: which candidates to evaluate, in which order, deterministically for the SPEC's seed.

- ``grid``: every distinct valid point of the space, in the dimensions' order (auto picks it when that many fit
  the budget);
- ``optuna``: Optuna's TPE sampler, multi-objective (minimise cost per hour, maximise SLO attainment) with the
  worst relative SLO excess as a constraint (feasible = every SLO met), seeded, one trial at a time (ask/tell),
  so the same seed gives the same trials; a point already evaluated (or the same deployment under another name,
  e.g. P/D candidates that differ only in the aggregated routing) is told its cached values and not counted,
  and an unseen neighbour of it (one or two dimensions changed, seeded) is enqueued as the next trial; a point
  that is no deployment (no pod, no decode pod) is told as infeasible without a run;
- ``random``: distinct valid points drawn uniformly with the seed (the baseline Optuna has to beat).

Evaluations run one after the other in this process: a candidate is ~1 s of one core, the box has two shared
cores, and one process keeps the order (and the optuna trials) a pure function of the seed.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from extproc.bench.plan.evaluate import Candidate, Evaluation, Materializer, canonical, evaluate
from extproc.bench.plan.spec import Spec, SpecError
from extproc.bench.workloads import Workload

log = logging.getLogger(__name__)

GRID_ENUMERATE_LIMIT = 2_000_000  # points of the raw product enumerated to count the valid grid


@dataclass(slots=True)
class SearchResult:
    method: str
    evaluations: list[Evaluation]
    grid_size: int  # raw product of the dimensions
    valid_grid: int | None  # distinct valid deployments (None: too many to enumerate)
    trials: int  # points asked (optuna/random: includes duplicates and invalid points)
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def grid_points(spec: Spec) -> Iterator[Candidate]:
    """Every distinct valid candidate, in the dimensions' order."""
    dims = spec.dimensions()
    seen: set[str] = set()
    for combo in itertools.product(*(vals for _, vals in dims)):
        c = canonical(spec, {name: v for (name, _), v in zip(dims, combo)})
        if c is not None and c.key not in seen:
            seen.add(c.key)
            yield c


def count_valid(spec: Spec) -> int | None:
    if spec.grid_size() > GRID_ENUMERATE_LIMIT:
        return None
    return sum(1 for _ in grid_points(spec))


def choose_method(spec: Spec, valid: int | None) -> str:
    if spec.method != "auto":
        return spec.method
    return "grid" if valid is not None and valid <= spec.budget else "optuna"


def run_search(
    spec: Spec,
    workload: Workload,
    mat: Materializer,
    on_result: Callable[[Evaluation, int], None] | None = None,
) -> SearchResult:
    """Evaluate up to ``spec.budget`` distinct candidates; ``on_result(evaluation, evaluated so far)`` after each."""
    t0 = time.perf_counter()
    valid = count_valid(spec)
    method = choose_method(spec, valid)
    if method == "grid" and valid is not None and valid > spec.budget:
        raise SpecError(spec.path, "budget", f"method grid evaluates all {valid} candidates: raise budget to {valid} or use optuna/random")
    evals: list[Evaluation] = []
    tokens: dict[int, list[int]] = {}  # the trace is tokenized once, for all candidates

    def run_one(c: Candidate) -> Evaluation:
        ev = evaluate(spec, workload, c, mat, f"c{len(evals) + 1:04d}", tokens)
        evals.append(ev)
        if on_result is not None:
            on_result(ev, len(evals))
        return ev

    trials = 0
    extra: dict[str, Any] = {}
    if method == "grid":
        for c in grid_points(spec):
            trials += 1
            run_one(c)
    elif method == "random":
        trials = _random_search(spec, run_one, valid)
    else:
        trials, extra = _optuna_search(spec, run_one, valid)
    return SearchResult(method, evals, spec.grid_size(), valid, trials, time.perf_counter() - t0, extra)


def _budget(spec: Spec, valid: int | None) -> int:
    return spec.budget if valid is None else min(spec.budget, valid)


def _random_search(spec: Spec, run_one: Callable[[Candidate], Evaluation], valid: int | None) -> int:
    rng = random.Random(f"plan-random:{spec.seed}")
    dims = spec.dimensions()
    want = _budget(spec, valid)
    seen: set[str] = set()
    trials = 0
    max_trials = 50 * want + 100
    while len(seen) < want and trials < max_trials:
        trials += 1
        c = canonical(spec, {name: vals[rng.randrange(len(vals))] for name, vals in dims})
        if c is None or c.key in seen:
            continue
        seen.add(c.key)
        run_one(c)
    return trials


def _objectives(ev: Evaluation) -> tuple[float, float]:
    return ev.candidate.cost_per_hour, ev.slo_attainment


def _constraint(ev: Evaluation) -> float:
    """<= 0: feasible (every SLO met). Finite for optuna: a failed run or a class with no completion is 10."""
    return 10.0 if not math.isfinite(ev.violation) else min(ev.violation, 10.0)


def _optuna_search(spec: Spec, run_one: Callable[[Candidate], Evaluation], valid: int | None) -> tuple[int, dict[str, Any]]:
    try:
        import optuna
    except ImportError:
        raise SpecError(spec.path, "method", "optuna is not installed (pip install 'extproc[plan]'), or use method: grid/random") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    want = _budget(spec, valid)
    startup = max(10, want // 10)
    # constraints: Trial.set_constraint (optuna >= 5; TPE ranks infeasible trials by their excess)
    sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    dims = spec.dimensions()
    # optuna's categorical choices must be None/bool/int/float/str: values are, but keep their index as the
    # parameter so a long path or a None never reaches its storage formatting
    cache: dict[str, Evaluation] = {}
    rng = random.Random(f"plan-optuna:{spec.seed}")
    trials = duplicates = invalid = mutations = 0
    max_trials = 20 * want + 100
    while len(cache) < want and trials < max_trials:
        trials += 1
        trial = study.ask()
        idx = {name: trial.suggest_categorical(name, list(range(len(vals)))) for name, vals in dims}
        c = canonical(spec, {name: vals[idx[name]] for name, vals in dims})
        if c is None:  # not a deployment: told as infeasible (so TPE learns to avoid it), never run
            invalid += 1
            trial.set_constraint("slo_excess", 10.0)
            study.tell(trial, [0.0, 0.0])
            continue
        ev = cache.get(c.key)
        fresh = ev is None
        if ev is None:
            ev = cache[c.key] = run_one(c)
        else:
            duplicates += 1
        trial.set_constraint("slo_excess", _constraint(ev))
        study.tell(trial, list(_objectives(ev)))
        if not fresh:
            # TPE keeps proposing a region it likes: try a neighbour it has not seen (one or two dimensions
            # changed, seeded), enqueued as the next trial, instead of asking again for the same point
            nb = _neighbour(spec, dims, idx, cache, rng)
            if nb is not None:
                mutations += 1
                study.enqueue_trial(nb)
    return trials, {"optuna": {"version": optuna.__version__, "sampler": "TPESampler", "n_startup_trials": startup,
                               "duplicate_trials": duplicates, "invalid_trials": invalid,
                               "neighbour_trials": mutations}}


def _neighbour(spec: Spec, dims: list[tuple[str, tuple[Any, ...]]], idx: dict[str, int], seen: dict[str, Evaluation],
               rng: random.Random) -> dict[str, int] | None:
    """An unseen valid point one or two dimensions away from ``idx`` (value indices), or None after 50 tries."""
    movable = [name for name, vals in dims if len(vals) > 1]
    if not movable:
        return None
    for _ in range(50):
        nb = dict(idx)
        for name in rng.sample(movable, min(len(movable), rng.choice((1, 2)))):
            n = len(dict(dims)[name])
            nb[name] = (nb[name] + rng.randrange(1, n)) % n
        c = canonical(spec, {name: vals[nb[name]] for name, vals in dims})
        if c is not None and c.key not in seen:
            return nb
    return None
