"""Convert inference-sim/training's default_args/ runs into fidelity SPEC files (extproc.sim.fidelity).

    python benchmarks/fidelity/convert_training.py /work/.mirror/inference-sim+training/repo benchmarks/fidelity

Source: github.com/inference-sim/training, default_args/<run>/ (vLLM 0.15.1 on H100-80GB, inference-perf
shared-prefix workloads): exp-config.yaml (model, TP, max_model_len, max_num_seqs, max_num_batched_tokens),
results/config.yaml (the workload inference-perf actually ran: num_groups x num_prompts_per_group prompts of
system_prompt_len + question_len tokens, output_len with ignore_eos, constant-rate stages) and
results/stage_<i>_lifecycle_metrics.json (client-side per-stage metrics). Runs whose failures exceed 10 % of
their requests are overloaded and dropped (the three reasoning runs of Llama-2-7b, Llama-2-70b and Mixtral).

Metrics: ttft_* and e2e_* are inference-perf's time_to_first_token and request_latency (mean, p90) in ms.
itl_mean is derived as (e2e mean - ttft mean) / (output_len - 1): inference-perf's inter_token_latency averages
over streamed chunks, which here arrive about two per token (its median gap is ~25 us), so it reads about half
the per-token time; the raw figure is kept as itl_mean_reported (not validated). extra_prompt_tokens = the
measured prompt_len mean minus system + question lengths (re-tokenising the decoded random text adds tokens).
Split by model (decided before any held-out result was looked at): fit = Llama-2-7b (TP1) + Llama-2-70b (TP4),
held out = CodeLlama-34b (TP2) + Mixtral-8x7B (TP2), so the held-out half has a TP degree between the fitted
ones, a new family (MoE) and a new size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

MODEL = {
    "meta-llama/Llama-2-7b-hf": "Llama-2-7b",
    "meta-llama/Llama-2-70b-hf": "Llama-2-70b",
    "mistralai/Mixtral-8x7B-v0.1": "Mixtral-8x7B",
    "codellama/CodeLlama-34b-Instruct-hf": "CodeLlama-34b",
}
FIT_MODELS = {"Llama-2-7b", "Llama-2-70b"}


def show(repo: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def main(repo: Path, out: Path) -> None:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD", "default_args"],
                           check=True, capture_output=True, text=True).stdout.split()
    runs = sorted({f.split("/")[1] for f in files})
    fit, held, dropped = [], [], []
    for run in runs:
        base = f"default_args/{run}"
        ec = yaml.safe_load(show(repo, f"{base}/exp-config.yaml"))
        rc = yaml.safe_load(show(repo, f"{base}/results/config.yaml"))
        sp = rc["data"]["shared_prefix"]
        stage_files = sorted(f for f in files if f.startswith(f"{base}/results/stage_"))
        stages = []
        total = fails = 0
        prompt_means = []
        for i, (sf, st) in enumerate(zip(stage_files, rc["load"]["stages"], strict=True)):
            m = json.loads(show(repo, sf))
            s = m["successes"]
            lat = s["latency"]
            total += s["count"] + m["failures"]["count"]
            fails += m["failures"]["count"]
            prompt_means.append(s["prompt_len"]["mean"])
            ttft = lat["time_to_first_token"]
            e2e = lat["request_latency"]
            out_len = int(sp["output_len"])
            stages.append({
                "rate": float(st["rate"]),
                "duration_s": float(st["duration"]),
                "measured": {
                    "ttft_mean": round(ttft["mean"] * 1000, 3),
                    "ttft_p90": round(ttft["p90"] * 1000, 3),
                    "e2e_mean": round(e2e["mean"] * 1000, 2),
                    "e2e_p90": round(e2e["p90"] * 1000, 2),
                    "itl_mean": round((e2e["mean"] - ttft["mean"]) * 1000 / (out_len - 1), 4),
                    "itl_mean_reported": round(lat["inter_token_latency"]["mean"] * 1000, 4),
                    "requests": s["count"],
                    "failures": m["failures"]["count"],
                },
            })
            assert sf.endswith(f"stage_{i}_lifecycle_metrics.json")
        model = MODEL[ec["model"]]
        name = run.split("-", 2)[2]
        if fails > 0.1 * total:
            dropped.append(f"{run} ({fails} of {total} requests failed)")
            continue
        extra = round(sum(prompt_means) / len(prompt_means) - sp["system_prompt_len"] - sp["question_len"])
        exp = {
            "name": name,
            "source": f"inference-sim/training@{commit[:10]} {base}/ (exp-config.yaml, results/config.yaml, "
                      f"results/stage_*_lifecycle_metrics.json)",
            "model": model,
            "tp": int(ec["tensor_parallelism"]),
            "max_num_seqs": int(ec["max_num_seqs"]),
            "max_num_batched_tokens": int(ec["max_num_batched_tokens"]),
            "max_model_len": int(ec["max_model_len"]),
            "workload": {
                "type": "shared_prefix",
                "num_groups": int(sp["num_groups"]),
                "prompts_per_group": int(sp["num_prompts_per_group"]),
                "system_prompt_len": int(sp["system_prompt_len"]),
                "question_len": int(sp["question_len"]),
                "output_len": int(sp["output_len"]),
                "extra_prompt_tokens": int(extra),
                "arrival": rc["load"]["type"],
            },
            "stages": stages,
        }
        (fit if model in FIT_MODELS else held).append(exp)
    defaults = {"gpu": "H100-SXM-80GB", "block_size": 16, "gpu_memory_utilization": 0.9,
                "enable_prefix_caching": True, "chunked_prefill": True}
    head = (f"vLLM 0.15.1 on H100-80GB (inference-sim/training@{commit[:10]} default_args/), converted by "
            "benchmarks/fidelity/convert_training.py; dropped as overloaded: " + "; ".join(dropped))
    for fname, exps, title in (("h100-fit.yaml", fit, "fit half (Llama-2-7b, Llama-2-70b)"),
                               ("h100-heldout.yaml", held, "held-out half (CodeLlama-34b, Mixtral-8x7B)")):
        doc = {"name": f"h100-default-args-{fname.split('-')[1].split('.')[0]}", "source": f"{title}: {head}",
               "defaults": defaults, "experiments": exps}
        (out / fname).write_text(yaml.safe_dump(doc, sort_keys=False, width=120), encoding="utf-8")
        print(f"wrote {out / fname}: {len(exps)} experiments, {sum(len(e['stages']) for e in exps)} stages")
    print("dropped:", *dropped, sep="\n  ")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
