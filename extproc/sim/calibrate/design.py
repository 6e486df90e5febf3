"""Experiment design: the calibration request sets (training and held-out waves) and the samples a run records.

A design spans prompt lengths × output lengths × concurrency levels × prefix-cache hit/miss. Prompts are
token-id lists (``/v1/completions`` accepts them), so prompt lengths and shared prefixes are exact and no
tokenizer is involved; ``ignore_eos`` + ``min_tokens`` pin the output length (see ``client.send_one``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

TOKEN_ID_LOW: Final = 16  # above the tiny tokenizer's special tokens
TOKEN_ID_HIGH: Final = 2000  # below the tiny vocab (2443) and the simulator's


@dataclass(slots=True)
class CalRequest:
    key: str
    cell: str  # design cell, e.g. "c4/p512/o64/hit"
    prompt: list[int]
    max_tokens: int
    cached_tokens: int  # expected prefix-cache hit (full blocks, at most prompt - 1 tokens)


@dataclass(slots=True)
class Wave:
    """Requests sent by ``len(lanes)`` concurrent clients; each lane sends its requests one after another."""

    name: str
    lanes: list[list[CalRequest]]


@dataclass(slots=True)
class Sample:
    req: CalRequest
    t_send: float
    t_first: float
    t_end: float
    prompt_tokens: int
    completion_tokens: int
    first_chunk_tokens: int = 1  # >1 when the server coalesced tokens (its frontend fell behind): TTFT is late
    chunks: int = 0

    @property
    def clean_first(self) -> bool:
        """Whether the first-token time is trustworthy: one token in the first chunk, and the tokens did not
        all arrive in one burst at the end (the client or the server frontend was starved of CPU meanwhile;
        no engine decodes a token in under 0.2 ms)."""
        if self.first_chunk_tokens > 1:
            return False
        n = self.completion_tokens - 1
        return n <= 0 or self.decode / n >= 0.0002

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_send

    @property
    def e2e(self) -> float:
        return self.t_end - self.t_send

    @property
    def decode(self) -> float:
        return self.t_end - self.t_first


class _Rng:
    """SplitMix64 (deterministic across Python versions)."""

    __slots__ = ("s",)

    def __init__(self, seed: int) -> None:
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def u64(self) -> int:
        self.s = (self.s + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.u64() % n

    def tokens(self, n: int) -> list[int]:
        span = TOKEN_ID_HIGH - TOKEN_ID_LOW
        return [TOKEN_ID_LOW + self.below(span) for _ in range(n)]


def _cached(shared_prefix: int, prompt_len: int, block_size: int) -> int:
    return (min(shared_prefix, prompt_len - 1) // block_size) * block_size


def design(
    *,
    seed: int,
    block_size: int,
    serial_prompts: Sequence[int],
    serial_outputs: Sequence[int],
    concurrency: Sequence[int],
    conc_prompts: Sequence[int],
    conc_outputs: Sequence[int],
    rounds: int,
    hit_every: int,
) -> list[Wave]:
    """Build the waves: a serial sweep (prompt × output, each miss then an exact repeat = hit) and, per
    concurrency level, closed-loop lanes cycling through prompt/output lengths where every ``hit_every``-th
    request repeats the lane's previous prompt with a fresh tail (prefix hit)."""
    rng = _Rng(seed)
    waves: list[Wave] = []
    lane: list[CalRequest] = []
    for p in serial_prompts:
        for o in serial_outputs:
            prompt = rng.tokens(p)
            lane.append(CalRequest(f"s-{len(lane)}", f"c1/p{p}/o{o}/miss", prompt, o, 0))
            lane.append(CalRequest(f"s-{len(lane)}", f"c1/p{p}/o{o}/hit", list(prompt), o, _cached(p, p, block_size)))
    waves.append(Wave("serial", [lane]))
    for c in concurrency:
        lanes: list[list[CalRequest]] = []
        for li in range(c):
            lane = []
            prev: list[int] | None = None
            for r in range(rounds):
                p = conc_prompts[(li + r) % len(conc_prompts)]
                o = conc_outputs[(li * 7 + r) % len(conc_outputs)]
                if prev is not None and hit_every > 0 and r % hit_every == hit_every - 1:
                    shared = min(len(prev), p - 1)
                    prompt = prev[:shared] + rng.tokens(p - shared)
                    cached, kind = _cached(shared, p, block_size), "hit"
                else:
                    prompt, cached, kind = rng.tokens(p), 0, "miss"
                lane.append(CalRequest(f"c{c}-{li}-{r}", f"c{c}/p{p}/o{o}/{kind}", prompt, o, cached))
                prev = prompt
            lanes.append(lane)
        waves.append(Wave(f"c{c}", lanes))
    return waves


def training_design(block_size: int, seed: int = 1) -> list[Wave]:
    return design(
        seed=seed,
        block_size=block_size,
        serial_prompts=(32, 256, 768, 1536),
        serial_outputs=(4, 32, 128),
        concurrency=(2, 4, 8),
        conc_prompts=(64, 512, 1024),
        conc_outputs=(16, 64, 128),
        rounds=4,
        hit_every=2,
    )


def heldout_design(block_size: int, seed: int = 2) -> list[Wave]:
    return design(
        seed=seed,
        block_size=block_size,
        serial_prompts=(100, 400, 1200),
        serial_outputs=(8, 48, 96),
        concurrency=(3, 6),
        conc_prompts=(200, 700, 1300),
        conc_outputs=(24, 80),
        rounds=4,
        hit_every=3,
    )
