"""``extproc predictor``: train the warm-start latency model on simulator traffic, and evaluate a model file.

    extproc predictor train --out extproc/predictor/data/latency-predictor.json      # generate data, fit, save, evaluate
    extproc predictor eval --model extproc/predictor/data/latency-predictor.json     # held-out MAPE and quantile coverage
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="predictor_command", metavar="ACTION")
    t = sub.add_parser("train", help="train TTFT/TPOT models on simulated fleet traffic and save them")
    t.add_argument("--out", default="extproc/predictor/data/latency-predictor.json", help="model file to write (JSON)")
    t.add_argument("--requests", type=int, default=20000, help="simulated requests for training (default 20000)")
    t.add_argument("--eval-requests", type=int, default=4000, help="held-out requests, other seed (default 4000)")
    t.add_argument("--seed", type=int, default=1, help="training traffic seed (held-out uses seed + 1000)")
    t.add_argument("--quantile", type=float, default=0.9, help="quantile of the routing models (default 0.9)")
    t.add_argument("--trees", type=int, default=60, help="rounds of the TTFT point model (default 60)")
    t.add_argument("--quantile-trees", type=int, default=20, help="TTFT quantile rounds on top of the point model (default 20)")
    t.add_argument("--tpot-trees", type=int, default=40, help="rounds of the TPOT point model (default 40)")
    t.add_argument("--tpot-quantile-trees", type=int, default=20, help="TPOT quantile rounds (default 20)")
    t.add_argument("--learning-rate", type=float, default=0.15, help="point-model learning rate (default 0.15)")
    t.add_argument("--quantile-learning-rate", type=float, default=0.2, help="quantile-round learning rate (default 0.2)")
    t.add_argument("--point-objective", choices=("l1", "regression"), default="l1", help="point-model loss on log ms (default l1)")
    t.add_argument("--num-leaves", type=int, default=15, help="leaves per tree (default 15)")
    t.add_argument("--max-depth", type=int, default=6, help="tree depth limit (default 6)")
    t.add_argument(
        "--phase-oracle",
        action="store_true",
        help="also fit a TTFT point model that is told the simulator's hidden step phase, to show the error floor",
    )
    t.add_argument("--lora-share", type=float, default=0.1, help="share of LoRA-adapter requests (default 0.1)")
    t.add_argument("--fleet", default="", help="comma-separated sim profiles (default: 2×H100, 2×A100, 2×L40S 8B)")
    t.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    e = sub.add_parser("eval", help="evaluate a model file on held-out simulated traffic")
    e.add_argument("--model", required=True, help="model file (JSON)")
    e.add_argument("--requests", type=int, default=4000, help="simulated requests (default 4000)")
    e.add_argument("--seed", type=int, default=2002, help="traffic seed (default 2002: neither train nor its held-out set)")
    e.add_argument("--lora-share", type=float, default=0.1, help="share of LoRA-adapter requests (default 0.1)")
    e.add_argument("--fleet", default="", help="comma-separated sim profiles (default: the training fleet)")
    e.add_argument("--json", action="store_true", help="print the evaluation as JSON")


def evaluate(model: Any, x: Any, ttft: Any, tpot: Any, pod_classes: dict[str, int] | None = None) -> dict[str, Any]:
    """MAPE / median APE of the point models and coverage of the quantile models, overall and per regime.

    Regimes: base-model vs LoRA requests; for base-model requests, no queue (``waiting`` = 0) vs queued, prefix
    cached (score ≥ 0.5) vs not; and each pod class.
    """
    import numpy as np

    from extproc.predictor.features import LORA_NONE, LORA_STATE, POD_CLASS, PREFIX_SCORE, WAITING

    q = model.predict(x)
    mn = model.predict_mean(x)
    has_tpot = tpot > 0
    base = x[:, LORA_STATE] == LORA_NONE
    queued = x[:, WAITING] > 0
    cached = x[:, PREFIX_SCORE] >= 0.5

    def block(mask: Any) -> dict[str, float]:
        kt = mask
        kp = mask & has_tpot
        return {
            "n": int(kt.sum()),
            "ttft_mape": float(np.mean(np.abs(mn.ttft_ms[kt] - ttft[kt]) / ttft[kt])) if kt.any() else float("nan"),
            "ttft_median_ape": float(np.median(np.abs(mn.ttft_ms[kt] - ttft[kt]) / ttft[kt])) if kt.any() else float("nan"),
            "ttft_p90_coverage": float(np.mean(ttft[kt] <= q.ttft_ms[kt])) if kt.any() else float("nan"),
            "tpot_mape": float(np.mean(np.abs(mn.tpot_ms[kp] - tpot[kp]) / tpot[kp])) if kp.any() else float("nan"),
            "tpot_median_ape": float(np.median(np.abs(mn.tpot_ms[kp] - tpot[kp]) / tpot[kp])) if kp.any() else float("nan"),
            "tpot_p90_coverage": float(np.mean(tpot[kp] <= q.tpot_ms[kp])) if kp.any() else float("nan"),
        }

    all_ = np.ones(len(ttft), dtype=bool)
    out = {
        "all": block(all_),
        "base_model_requests": block(base),
        "lora_requests": block(~base),
        "base_no_queue": block(base & ~queued),
        "base_queued": block(base & queued),
        "base_prefix_cached": block(base & cached),
        "base_prefix_uncached": block(base & ~cached),
    }
    for name, code in sorted((pod_classes or {}).items(), key=lambda kv: kv[1]):
        mask = x[:, POD_CLASS] == code
        if mask.any():
            out[f"class_{name}"] = block(mask)
    return out


def phase_oracle_mape(train: Any, held: Any, cfg: Any) -> dict[str, float]:
    """TTFT point-model error when the model is also told the hidden step phase (simulator only).

    The phase (time left in the step the pod is running when the request arrives) is what a scheduler cannot see
    from metrics; fitting the same model with it as an extra column shows how much of the error it explains.
    """
    import lightgbm as lgb
    import numpy as np

    from extproc.predictor.features import CATEGORICAL_FEATURES, FEATURE_NAMES, LORA_NONE, LORA_STATE, WAITING
    from extproc.predictor.trainer import lgb_params

    names = [*FEATURE_NAMES, "oracle_phase_ms"]
    xtr = np.column_stack([train.x, train.phase_ms])
    xte = np.column_stack([held.x, held.phase_ms])
    ds = lgb.Dataset(xtr, np.log(train.ttft_ms), feature_name=names, categorical_feature=list(CATEGORICAL_FEATURES), params={"verbose": -1})
    b = lgb.train(lgb_params(cfg, cfg.point_objective), ds, num_boost_round=cfg.n_trees)
    pred = np.exp(b.predict(xte, num_threads=1))
    ape = np.abs(pred - held.ttft_ms) / held.ttft_ms
    base = held.x[:, LORA_STATE] == LORA_NONE
    noq = base & (held.x[:, WAITING] == 0)
    return {
        "ttft_mape": float(ape.mean()),
        "ttft_median_ape": float(np.median(ape)),
        "base_no_queue_ttft_mape": float(ape[noq].mean()),
        "base_queued_ttft_mape": float(ape[base & ~noq].mean()),
        "lora_ttft_mape": float(ape[~base].mean()),
    }


def _print_eval(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    print(f"{'slice':<28}{'n':>7}{'TTFT MAPE':>11}{'med APE':>9}{'TTFT cov':>10}{'TPOT MAPE':>11}{'med APE':>9}{'TPOT cov':>10}")
    for name, b in res.items():
        if not isinstance(b, dict) or "n" not in b:
            continue
        print(
            f"{name:<28}{b['n']:>7}{b['ttft_mape']:>11.3f}{b['ttft_median_ape']:>9.3f}{b['ttft_p90_coverage']:>10.3f}"
            f"{b['tpot_mape']:>11.3f}{b['tpot_median_ape']:>9.3f}{b['tpot_p90_coverage']:>10.3f}"
        )


def _fleet(spec: str) -> tuple[str, ...]:
    from extproc.sim.trainingdata import DEFAULT_FLEET
    from extproc.sim.profiles import parse_fleet

    if not spec:
        return DEFAULT_FLEET
    return tuple(name for name, n in parse_fleet(spec) for _ in range(n))


def _train(args: argparse.Namespace) -> int:
    import time

    from extproc.predictor.features import PodClassCodes
    from extproc.predictor.model import LatencyModel
    from extproc.predictor.persistence import save_model
    from extproc.sim.trainingdata import generate
    from extproc.predictor.trainer import TrainerConfig, fit_models

    fleet = _fleet(args.fleet)
    classes = PodClassCodes()
    t0 = time.perf_counter()
    train = generate(args.requests, seed=args.seed, fleet=fleet, classes=classes, lora_share=args.lora_share)
    held = generate(args.eval_requests, seed=args.seed + 1000, fleet=fleet, classes=classes, lora_share=args.lora_share)
    gen_s = time.perf_counter() - t0
    cfg = TrainerConfig(
        quantile_alpha=args.quantile,
        n_trees=args.trees,
        quantile_trees=args.quantile_trees,
        tpot_trees=args.tpot_trees,
        tpot_quantile_trees=args.tpot_quantile_trees,
        learning_rate=args.learning_rate,
        quantile_learning_rate=args.quantile_learning_rate,
        point_objective=args.point_objective,
        num_leaves=args.num_leaves,
        max_depth=args.max_depth,
        max_train_samples=max(1, len(train)),
        seed=args.seed,
    )
    res = fit_models(train.x, train.ttft_ms, train.tpot_ms, cfg)
    model = LatencyModel.from_strings(
        res.strings,
        version=1,
        quantile_alpha=args.quantile,
        n_samples=res.n_samples,
        pod_classes=classes.as_dict(),
        metadata={
            "source": "simulator",
            "fleet": list(fleet),
            "train_requests": args.requests,
            "seed": args.seed,
            "lora_share": args.lora_share,
            "trees": args.trees,
            "quantile_trees": args.quantile_trees,
            "tpot_trees": args.tpot_trees,
            "tpot_quantile_trees": args.tpot_quantile_trees,
            "learning_rate": args.learning_rate,
            "quantile_learning_rate": args.quantile_learning_rate,
            "point_objective": args.point_objective,
            "num_leaves": args.num_leaves,
            "max_depth": args.max_depth,
            "command": "extproc predictor train " + " ".join(sys.argv[3:]),
        },
    )
    ev = evaluate(model, held.x, held.ttft_ms, held.tpot_ms, classes.as_dict())
    model = LatencyModel.from_strings(
        res.strings,
        version=1,
        quantile_alpha=args.quantile,
        n_samples=res.n_samples,
        pod_classes=classes.as_dict(),
        metadata={**model.metadata, "held_out": ev},
    )
    save_model(model, args.out)
    if not args.json:
        print(f"generated {len(train)} training + {len(held)} held-out samples in {gen_s:.1f}s; trained 4 models in {res.seconds:.2f}s")
        print(f"trees per hot-path booster: ttft_q {model.ttft_q.num_trees()}, tpot_q {model.tpot_q.num_trees()}")
        print(f"wrote {args.out}")
    _print_eval(ev, args.json)
    if args.phase_oracle:
        oracle = phase_oracle_mape(train, held, cfg)
        if args.json:
            print(json.dumps({"phase_oracle": oracle}, indent=2))
        else:
            print("with the hidden step phase as an extra feature (not available to a scheduler): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in oracle.items()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from extproc.predictor.features import PodClassCodes
    from extproc.predictor.persistence import load_model
    from extproc.sim.trainingdata import generate

    model = load_model(args.model)
    classes = PodClassCodes(model.pod_classes)
    held = generate(args.requests, seed=args.seed, fleet=_fleet(args.fleet), classes=classes, lora_share=args.lora_share)
    ev = evaluate(model, held.x, held.ttft_ms, held.tpot_ms, classes.as_dict())
    if not args.json:
        print(f"model v{model.version} ({model.metadata.get('source', '?')}), {len(held)} held-out samples, seed {args.seed}")
    _print_eval(ev, args.json)
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "predictor_command", None)
    if cmd == "train":
        return _train(args)
    if cmd == "eval":
        return _eval(args)
    print("usage: extproc predictor {train,eval} ...", file=sys.stderr)
    return 2
