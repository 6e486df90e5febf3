"""A pure model of one vLLM V1 engine: continuous batching, chunked prefill, paged KV with prefix caching,
preemption by recompute, LoRA slots. No asyncio, no sockets, no wall clock: the caller passes ``now`` and
decides how to wait for ``StepResult.duration_s``, so the HTTP pods (real time) and a virtual-time
discrete-event benchmark drive the same code.

API (stable)::

    eng = Engine(profile, seed=0, time_scale=1.0)
    eng.add_request(SimRequest(request_id, prompt_token_ids, max_tokens, lora=None, arrival=now))
    while eng.has_work():
        res = eng.step(now)          # schedules one step starting at ``now``
        now += res.duration_s        # ... the caller waits; tokens in ``res.outputs`` exist at ``now``
    eng.abort(request_id)            # frees its blocks; True if it was live
    eng.cached_prefix_tokens(ids)    # tokens of ``ids`` a new request would find in the prefix cache

Scheduling follows vLLM V1's scheduler: running requests first, in order, each gets its remaining tokens
(1 when decoding, a chunk of its prompt when prefilling) under the ``max_num_batched_tokens`` budget; when the
KV cache has no free block for a running request, the last running request is preempted (its blocks freed,
it goes back to the front of the waiting queue and recomputes later, prefix hits included). New requests are
admitted FCFS only if no preemption happened this step, while ``max_num_seqs``, the token budget, the KV cache
and the LoRA slots allow; a request whose adapter would exceed ``max_loras`` distinct adapters in the batch is
skipped (keeps its place). A new request first takes the longest cached prefix of full blocks (at most
``prompt - 1`` tokens, the last token is always recomputed).

Step time (seconds) = time_scale × slowdown × (b0 + b1·prefill_tokens + b2·decode_tokens + a0·admitted
+ lora_load_ms·adapters_loaded) / 1000, where prefill_tokens are the uncached prompt tokens computed in the step
and decode_tokens the sequences generating their next token. A request emits one token at the end of the step
that computes its last pending token; it finishes after ``max_tokens`` tokens (ignore_eos), capped by
``max_model_len``. Output ids are drawn deterministically from (seed, prompt, position).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

from extproc.sim.kvcache import KVCache, KVEvent, KVGroupSpec, hash_block
from extproc.sim.offload import CPUOffloadTier
from extproc.sim.profiles import Profile
from extproc.datalayer.simtokenizer import get_tokenizer

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "SimRequest",
    "RequestOutput",
    "FinishedRequest",
    "StepResult",
    "EngineStats",
    "Engine",
]

DEFAULT_MAX_TOKENS = 16

_WAITING = 0
_RUNNING = 1
_DONE = 2


@dataclass(slots=True)
class SimRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int | None = None
    lora: str | None = None
    arrival: float = 0.0
    # P/D (vLLM NixlConnector semantics). Prefill leg: ``remote_decode`` keeps the prompt's block ids in the
    # finishing output (they go back to the router in kv_transfer_params). Decode leg: ``remote_tokens`` prompt
    # tokens arrive over the network and are usable from ``ready_at`` (engine time; until then the request waits
    # like vLLM's WAITING_FOR_REMOTE_KVS); ``remote_failed`` marks a transfer that fails, handled by
    # ``failure_policy`` ("fail": the request ends with finish_reason "error"; "recompute": local prefill).
    remote_decode: bool = False
    remote_tokens: int = 0
    ready_at: float = 0.0
    remote_failed: bool = False
    failure_policy: str = "fail"
    transfer_s: float = 0.0  # for the pod's NIXL metrics: the transfer's duration and size
    transfer_bytes: int = 0


@dataclass(slots=True)
class RequestOutput:
    """What one request got from a step: at most one new token, and whether it finished."""

    request_id: str
    token_ids: list[int]
    first_token: bool
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    block_ids: list[int] | None = None  # prefill leg (remote_decode): the prompt's KV blocks, on the last output
    num_remote_tokens: int = 0  # decode leg: prompt tokens whose KV came over the network


@dataclass(slots=True)
class FinishedRequest:
    """Timestamps of a finished request (engine time), for the latency histograms."""

    request_id: str
    finish_reason: str
    arrival: float
    scheduled: float
    first_token: float
    finished: float
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(slots=True)
class StepResult:
    duration_s: float
    outputs: list[RequestOutput]
    kv_events: list[KVEvent]
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_scheduled: int = 0
    preempted: list[str] = field(default_factory=list)
    loras_loaded: list[str] = field(default_factory=list)
    idle: bool = False  # nothing could run: the engine waits for a remote KV transfer to land (duration_s)
    kv_loads: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) of transfers that landed
    kv_load_failures: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)


@dataclass(slots=True)
class EngineStats:
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens_cached_total: int = 0
    steps_total: int = 0
    busy_time_s: float = 0.0
    kv_transfers_total: int = 0  # decode side: remote KV loads that completed
    kv_transfer_failures_total: int = 0
    kv_transfer_tokens_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    finished_reasons: dict[str, int] = field(default_factory=dict)


class _Seq:
    __slots__ = (
        "req",
        "rid",
        "tokens",
        "num_prompt",
        "max_out",
        "num_out",
        "num_computed",
        "tables",
        "hashes",
        "num_cached_blocks",
        "num_cached_prompt",
        "lora",
        "lora_id",
        "digest",
        "state",
        "t_sched",
        "t_first",
        "t_last",
        "counted_cache",
        "remote_tokens",
    )

    def __init__(self, req: SimRequest, max_out: int, lora_id: int | None, digest: int) -> None:
        self.req = req
        self.rid = req.request_id
        self.tokens: list[int] = list(req.prompt_token_ids)
        self.num_prompt = len(self.tokens)
        self.max_out = max_out
        self.num_out = 0
        self.num_computed = 0
        self.tables: list[list[int]] = []  # one block table per KV-cache group (sliding-window: -1 = freed slot)
        self.hashes: list[int] = []
        self.num_cached_blocks = 0
        self.num_cached_prompt = 0
        self.lora = req.lora
        self.lora_id = lora_id
        self.digest = digest
        self.state = _WAITING
        self.t_sched = -1.0
        self.t_first = -1.0
        self.t_last = -1.0
        self.counted_cache = False
        self.remote_tokens = req.remote_tokens


class Engine:
    """One simulated vLLM engine. Not thread-safe; drive it from one task / loop."""

    def __init__(
        self,
        profile: Profile,
        *,
        seed: int = 0,
        time_scale: float = 1.0,
        enable_prefix_caching: bool = True,
        record_kv_events: bool = True,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.profile = profile
        self.seed = seed
        self.time_scale = time_scale
        self.slowdown = 1.0
        groups = [KVGroupSpec.from_dict(dict(g)) for g in profile.kv_cache_groups] if profile.kv_cache_groups else None
        self.kv = KVCache(
            profile.num_gpu_blocks,
            profile.block_size,
            enable_prefix_caching=enable_prefix_caching,
            hash_seed=seed,
            record_events=record_kv_events,
            groups=groups,
        )
        self.max_model_len = min(profile.max_model_len, self._max_len_in_cache())
        self.stats = EngineStats()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._seqs: dict[str, _Seq] = {}
        self._lora_slots: OrderedDict[str, None] = OrderedDict()
        self._remote_waiting = 0  # waiting requests still expecting a remote KV transfer (decode leg)
        self._lora_ids: dict[str, int] = {}
        self._out_ids = get_tokenizer().output_token_ids
        p = profile
        self._b0 = p.b0_ms / 1000.0
        self._b1 = p.b1_ms / 1000.0
        self._b2 = p.b2_ms / 1000.0
        self._a0 = p.a0_ms / 1000.0
        self._lora_load = p.lora_load_ms / 1000.0
        # physics-based step time (extproc.sim.roofline) when the profile carries one; else b0 + b1 + b2
        self.step_model: Callable[[Sequence[tuple[_Seq, int]]], float] | None = None
        if p.roofline is not None:
            from extproc.sim.roofline import step_model_from_profile

            self.step_model = step_model_from_profile(p.roofline)
        # CPU KV-offload tier (extproc.sim.offload): write-through copies of GPU-cached blocks, loaded back on a miss
        self.cpu_tier: CPUOffloadTier | None = None
        if p.cpu_offload_blocks > 0:
            if self.kv.hybrid:
                raise ValueError(f"profile {p.name}: the CPU offload tier is modelled for one full-attention KV-cache group only")
            self.cpu_tier = CPUOffloadTier(
                p.cpu_offload_blocks, p.block_size, p.cpu_load_ms_per_block / 1000.0, record_events=record_kv_events
            )
            self.kv.on_store = self.cpu_tier.store

    def _max_len_in_cache(self) -> int:
        """Longest sequence whose blocks fit the whole cache: a full-attention group holds a block per
        ``block_size`` tokens, a sliding-window group at most its window + one scheduling chunk (its blocks outside
        the window are freed at the next step), so a prompt prefilled in one chunk briefly holds both in full."""
        p = self.profile
        bs = p.block_size
        blocks = p.num_gpu_blocks
        kv = self.kv
        if not kv.hybrid:
            return blocks * bs
        n_full = sum(1 for w in kv._sw if not w)
        caps = [-(-(w - 1 + p.max_num_batched_tokens) // bs) + 1 for w in kv._sw if w]

        def need(n: int) -> int:  # blocks for a sequence of n blocks
            return n_full * n + sum(min(n, c) for c in caps)

        lo, hi = 0, -(-p.max_model_len // bs)
        while lo < hi:  # largest n with need(n) <= blocks (need is monotone)
            mid = (lo + hi + 1) // 2
            if need(mid) <= blocks:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ValueError(f"profile {p.name}: {blocks} KV blocks cannot hold one block per KV-cache group")
        return lo * bs

    # ---- gauges -----------------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    @property
    def running_loras(self) -> list[str]:
        return sorted({s.lora for s in self._running if s.lora})

    @property
    def waiting_loras(self) -> list[str]:
        return sorted({s.lora for s in self._waiting if s.lora})

    @property
    def loaded_loras(self) -> list[str]:
        return list(self._lora_slots)

    def num_tokens_in_flight(self) -> int:
        """Tokens (prompt + generated) of every live request."""
        return sum(len(s.tokens) for s in self._seqs.values())

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def is_live(self, request_id: str) -> bool:
        return request_id in self._seqs

    def lora_id(self, name: str) -> int:
        lid = self._lora_ids.get(name)
        if lid is None:
            lid = len(self._lora_ids) + 1
            self._lora_ids[name] = lid
        return lid

    # ---- requests ---------------------------------------------------------------------------------------------
    def validate(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """Output length this request would get; ValueError (vLLM's message) if it cannot fit the context."""
        mml = self.max_model_len
        if num_prompt_tokens <= 0:
            raise ValueError("The prompt must contain at least one token.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        want = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if num_prompt_tokens >= mml or (max_tokens is not None and num_prompt_tokens + max_tokens > mml):
            raise ValueError(
                f"This model's maximum context length is {mml} tokens. However, you requested "
                f"{num_prompt_tokens + want} tokens ({num_prompt_tokens} in the messages, {want} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        return min(want, mml - num_prompt_tokens)

    def add_request(self, req: SimRequest) -> None:
        if req.request_id in self._seqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        max_out = self.validate(len(req.prompt_token_ids), req.max_tokens)
        lora_id = self.lora_id(req.lora) if req.lora else None
        digest = xxhash.xxh3_64_intdigest(
            b"".join(t.to_bytes(4, "little", signed=True) for t in req.prompt_token_ids[-64:]), seed=self.seed
        )
        seq = _Seq(req, max_out, lora_id, digest)
        self._seqs[req.request_id] = seq
        self._waiting.append(seq)
        if req.remote_tokens > 0:
            self._remote_waiting += 1

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.state == _RUNNING:
            self._running.remove(seq)
        elif seq.state == _WAITING:
            self._waiting.remove(seq)
            if seq.remote_tokens > 0:
                self._remote_waiting -= 1
        if seq.tables:
            self.kv.free_tables(seq.tables)
            seq.tables = []
        seq.state = _DONE
        fr = self.stats.finished_reasons
        fr["abort"] = fr.get("abort", 0) + 1
        return True

    def cached_prefix_tokens(self, prompt_token_ids: Sequence[int], lora: str | None = None) -> int:
        hashes: list[int] = []
        self.kv.extend_hashes(hashes, prompt_token_ids, lora)
        max_blocks = (len(prompt_token_ids) - 1) // self.kv.block_size if prompt_token_ids else 0
        return self.kv.find_hit(hashes, max_blocks)[0] * self.kv.block_size

    def reset(self) -> list[str]:
        """Drop every request and the whole cache (a crash/restart); returns the dropped request ids."""
        dropped = list(self._seqs)
        self._seqs.clear()
        self._waiting.clear()
        self._running.clear()
        self._lora_slots.clear()
        self._remote_waiting = 0
        self.kv.reset()
        if self.cpu_tier is not None:
            self.cpu_tier.reset()
        return dropped

    # ---- the step ---------------------------------------------------------------------------------------------
    def _preempt(self, seq: _Seq, preempted: list[str]) -> None:
        self.kv.free_tables(seq.tables)
        seq.tables = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0
        seq.state = _WAITING
        self._waiting.appendleft(seq)
        self.stats.num_preemptions_total += 1
        preempted.append(seq.rid)

    def step(self, now: float) -> StepResult:
        kv = self.kv
        bs = kv.block_size
        hybrid = kv.hybrid
        prof = self.profile
        budget = prof.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        preempted: list[str] = []
        loaded: list[str] = []
        prefill_tokens = 0
        decode_tokens = 0
        admitted = 0
        cpu = self.cpu_tier
        cpu_loaded = 0  # blocks loaded back from the CPU tier this step
        failed_outputs: list[RequestOutput] = []
        failed_finished: list[FinishedRequest] = []
        landed: list[tuple[float, int]] = []
        n_failed = self.stats.kv_transfer_failures_total
        if self._remote_waiting:
            self._land_failed_transfers(now, failed_outputs, failed_finished)
        n_failed = self.stats.kv_transfer_failures_total - n_failed

        # 1. running requests, in order
        running = self._running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if hybrid:
                kv.remove_skipped(seq.tables, seq.num_computed)
            ok = True
            if kv.blocks_needed(seq.tables, seq.num_computed + n) > 0:
                while True:
                    if kv.allocate_tables(seq.tables, seq.num_computed + n):
                        break
                    victim = running.pop()
                    self._preempt(victim, preempted)
                    if victim is seq:
                        ok = False
                        break
            if not ok:
                break
            scheduled.append((seq, n))
            budget -= n
            i += 1

        # 2. waiting requests, FCFS, only if nothing was preempted
        if not preempted:
            waiting = self._waiting
            skipped: list[_Seq] = []
            max_seqs = prof.max_num_seqs
            max_loras = prof.max_loras
            active_loras = {s.lora for s in running if s.lora}
            while waiting and budget > 0 and len(running) < max_seqs:
                seq = waiting[0]
                if seq.remote_tokens > 0 and seq.req.ready_at > now:
                    skipped.append(waiting.popleft())  # WAITING_FOR_REMOTE_KVS: keeps its place
                    continue
                if seq.lora and seq.lora not in active_loras and len(active_loras) >= max_loras:
                    skipped.append(waiting.popleft())
                    continue
                num_tokens = len(seq.tokens)
                kv.extend_hashes(seq.hashes, seq.tokens, seq.lora)
                n_hit, tables = kv.find_hit(seq.hashes, (num_tokens - 1) // bs)
                cpu_hits = cpu.match(seq.hashes, n_hit, (num_tokens - 1) // bs) if cpu is not None else 0
                local_hit_tokens = hit_tokens = (n_hit + cpu_hits) * bs
                remote = seq.remote_tokens
                if remote > 0 and seq.num_out == 0:
                    remote = min(remote, num_tokens - 1)  # the last prompt token is always computed locally
                    if remote > hit_tokens:
                        hit_tokens = remote
                        cpu_hits = 0  # the transfer brings those blocks too
                else:
                    remote = 0
                n = min(num_tokens - hit_tokens, budget)
                need = kv.blocks_needed(tables, hit_tokens + n)
                if need > kv.num_free_blocks - kv.num_evictable_in_tables(tables):
                    break
                kv.touch_tables(tables)
                ok_alloc = kv.allocate_tables(tables, hit_tokens + n)
                cpu_loaded += cpu_hits
                assert ok_alloc
                waiting.popleft()
                seq.tables = tables
                seq.num_computed = hit_tokens
                seq.num_cached_blocks = n_hit
                st = self.stats
                st.prefix_cache_queries += num_tokens
                st.prefix_cache_hits += n_hit * bs  # GPU hits (vLLM counts connector hits apart)
                if not seq.counted_cache:
                    seq.num_cached_prompt = local_hit_tokens
                if seq.remote_tokens > 0:
                    # the transfer has landed: its blocks are this request's now (a preemption recomputes them)
                    seq.remote_tokens = 0
                    self._remote_waiting -= 1
                    st.kv_transfers_total += 1
                    st.kv_transfer_tokens_total += max(remote - local_hit_tokens, 0)
                    landed.append((seq.req.transfer_s, seq.req.transfer_bytes))
                if seq.lora:
                    if seq.lora not in self._lora_slots:
                        if len(self._lora_slots) >= max_loras:
                            for name in self._lora_slots:
                                if name not in active_loras:
                                    del self._lora_slots[name]
                                    break
                        self._lora_slots[seq.lora] = None
                        loaded.append(seq.lora)
                    else:
                        self._lora_slots.move_to_end(seq.lora)
                    active_loras.add(seq.lora)
                seq.state = _RUNNING
                if seq.t_sched < 0:
                    seq.t_sched = now
                running.append(seq)
                admitted += 1
                scheduled.append((seq, n))
                budget -= n
            if skipped:
                waiting.extendleft(reversed(skipped))

        if not scheduled and (failed_outputs or self._remote_waiting):
            # nothing runnable: the engine idles until the next remote KV transfer lands (or returns at once, to
            # report transfers that failed)
            pending = [s.req.ready_at for s in self._waiting if s.remote_tokens > 0 and s.req.ready_at > now]
            if failed_outputs or pending:
                wait = 0.0 if failed_outputs else min(pending) - now
                res0 = StepResult(wait, failed_outputs, kv.take_events() if kv.events else [], preempted=preempted, idle=True)
                res0.finished.extend(failed_finished)
                res0.kv_load_failures = n_failed
                return res0

        # 3. step time
        for seq, n in scheduled:
            if seq.num_computed + n == len(seq.tokens) and seq.num_computed >= seq.num_prompt and n == 1:
                decode_tokens += 1
            else:
                prefill_tokens += n
        if self.step_model is not None:
            cost = self.step_model(scheduled) + self._a0 * admitted
        else:
            cost = self._b0 + self._b1 * prefill_tokens + self._b2 * decode_tokens + self._a0 * admitted
        cost += self._lora_load * len(loaded)
        if cpu_loaded:
            assert cpu is not None
            cost += cpu.load_s_per_block * cpu_loaded
            cpu.blocks_loaded += cpu_loaded
        duration = cost * self.time_scale * self.slowdown
        end = now + duration

        # 4. execute: advance computed tokens, cache full blocks, sample tokens
        outputs: list[RequestOutput] = failed_outputs
        res = StepResult(duration, outputs, [], prefill_tokens, decode_tokens, len(scheduled), preempted, loaded)
        res.finished.extend(failed_finished)
        res.kv_loads = landed
        res.kv_load_failures = n_failed
        st = self.stats
        out_ids = self._out_ids
        n_out_ids = len(out_ids)
        finished_any = False
        for seq, n in scheduled:
            seq.num_computed += n
            full = seq.num_computed // bs
            if full > seq.num_cached_blocks:
                kv.extend_hashes(seq.hashes, seq.tokens, seq.lora)
                kv.cache_tables(seq.tables, seq.hashes, seq.num_cached_blocks, full, seq.tokens, seq.lora_id, seq.lora)
                seq.num_cached_blocks = full
            if seq.num_computed < len(seq.tokens):
                continue  # prefill chunk, no token yet
            pos = seq.num_out
            tok = out_ids[xxhash.xxh3_64_intdigest(pos.to_bytes(4, "little"), seed=seq.digest) % n_out_ids]
            seq.tokens.append(tok)
            seq.num_out = pos + 1
            st.generation_tokens_total += 1
            first = pos == 0
            if first:
                seq.t_first = end
                res.ttft_s.append(end - seq.req.arrival)
                st.prompt_tokens_total += seq.num_prompt
                if not seq.counted_cache:
                    seq.counted_cache = True
                    st.prompt_tokens_cached_total += seq.num_cached_prompt
            else:
                res.itl_s.append(end - seq.t_last)
            seq.t_last = end
            done = seq.num_out >= seq.max_out
            outputs.append(
                RequestOutput(
                    seq.rid, [tok], first, done, "length" if done else None, seq.num_prompt, seq.num_out,
                    seq.num_cached_prompt, list(seq.tables[0]) if (done and seq.req.remote_decode) else None,
                    seq.req.remote_tokens,
                )
            )
            if done:
                finished_any = True
                seq.state = _DONE
                kv.free_tables(seq.tables)
                seq.tables = []
                del self._seqs[seq.rid]
                fr = st.finished_reasons
                fr["length"] = fr.get("length", 0) + 1
                res.finished.append(
                    FinishedRequest(
                        seq.rid, "length", seq.req.arrival, seq.t_sched, seq.t_first, end, seq.num_prompt, seq.num_out
                    )
                )
        if finished_any:
            self._running = [s for s in self._running if s.state == _RUNNING]
        res.kv_events = kv.take_events() if kv.events else []
        if cpu is not None and cpu.events:
            res.kv_events.extend(cpu.take_events())
        st.steps_total += 1
        st.busy_time_s += duration
        return res

    def _land_failed_transfers(self, now: float, outputs: list[RequestOutput], finished: list[FinishedRequest]) -> None:
        """Remote KV loads whose time has come and that failed: ``fail`` ends the request with an error,
        ``recompute`` turns it into a local prefill (vLLM's kv_load_failure_policy)."""
        st = self.stats
        for seq in [s for s in self._waiting if s.remote_tokens > 0 and s.req.remote_failed and s.req.ready_at <= now]:
            st.kv_transfer_failures_total += 1
            self._remote_waiting -= 1
            seq.remote_tokens = 0
            if seq.req.failure_policy == "recompute":
                continue  # stays in the queue, prefills locally
            self._waiting.remove(seq)
            del self._seqs[seq.rid]
            seq.state = _DONE
            fr = st.finished_reasons
            fr["error"] = fr.get("error", 0) + 1
            outputs.append(RequestOutput(seq.rid, [], False, True, "error", seq.num_prompt, 0, 0))
            finished.append(FinishedRequest(seq.rid, "error", seq.req.arrival, now, now, now, seq.num_prompt, 0))

    def has_ready_work(self, now: float) -> bool:
        """Work that can run at ``now`` (not only requests waiting for a remote KV transfer)."""
        if self._running:
            return True
        return any(s.remote_tokens <= 0 or s.req.ready_at <= now for s in self._waiting)

    def step_time(self, prefill_tokens: int, decode_tokens: int, admitted: int = 0, loras_loaded: int = 0) -> float:
        """The step-time formula alone (seconds, before time_scale/slowdown), for tests and calibration."""
        return (
            self._b0 + self._b1 * prefill_tokens + self._b2 * decode_tokens + self._a0 * admitted
            + self._lora_load * loras_loaded
        )


# keep hash_block importable from here for callers that reproduce block hashes
__all__ += ["hash_block"]
