#!/usr/bin/env python
"""Start N real vLLM CPU servers on the tiny local model and keep them up until Ctrl-C / SIGTERM.

    .venv/bin/python scripts/real_vllm_serve.py --pods 2 [--kv-blocks 20] [--lora]

Prints one JSON line when every server is healthy, in the shape ``extproc sim`` prints (endpoints and
kv_events), so the same tooling can point at real pods:

    {"endpoints": ["127.0.0.1:P", ...], "kv_events": {"127.0.0.1:P": {"endpoint", "replay", "topic"}}, ...}

Needs the venv from scripts/real_vllm_setup.sh. Every server runs in its own process group, which is killed
on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

from extproc.sim.calibrate import VllmLaunchSpec, real_vllm_servers, vllm_python, vllm_venv
from extproc.sim.tiny_model import build_tiny_model


async def serve(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="real-vllm-serve-") as tmp:
        wd = Path(tmp)
        model_dir = build_tiny_model(args.model_dir or wd / "tiny")
        spec = VllmLaunchSpec(
            model_dir,
            served_model_name=args.served_model_name,
            num_gpu_blocks=args.kv_blocks,
            enable_lora=args.lora,
            max_num_seqs=args.max_num_seqs,
        )
        async with real_vllm_servers([spec] * args.pods, workdir=wd / "run") as servers:
            line = {
                "endpoints": [s.address for s in servers],
                "kv_events": {
                    s.address: {"endpoint": s.kv_endpoint, "replay": s.kv_replay_endpoint, "topic": s.kv_topic}
                    for s in servers
                },
                "startup_s": {s.address: round(s.startup_s, 1) for s in servers},
                "logs": {s.address: str(s.log_path) for s in servers},
            }
            print(json.dumps(line), flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            waiters = [asyncio.ensure_future(s.process.wait()) for s in servers]
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
            for t in (stopper, *waiters):
                t.cancel()
            if stopper not in done:
                print("a vLLM server exited; stopping the others", file=sys.stderr)
                return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--model-dir", type=Path, default=None, help="tiny model directory (default: build a fresh one)")
    p.add_argument("--served-model-name", default="tiny")
    p.add_argument("--kv-blocks", type=int, default=None, help="--num-gpu-blocks-override (>= 17)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--lora", action="store_true", help="enable LoRA (1 slot, rank 8)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if vllm_python() is None:
        print(f"no real vLLM venv at {vllm_venv()}; run scripts/real_vllm_setup.sh", file=sys.stderr)
        return 2
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
