"""``disagg-profile-handler``: prefill/decode disaggregation (llm-d-router
pkg/epp/framework/plugins/scheduling/profilehandler/disagg/disagg_profile_handler.go).

Parameters (the reference's nested format; its deprecated flat names ``decodeProfile``, ``prefillProfile``,
``prefillDeciderPluginName``, ``deciderPluginName`` are accepted too)::

    profiles: {decode: decode, prefill: prefill, encode: encode}   # profile names (these defaults)
    deciders: {prefill: <decider>, encode: <decider>}             # without one, that stage is off
    stageOrder: decode-first | prefill-first                      # default decode-first

decode-first: the ``decode`` profile picks the decode pod; the decider is asked with that pod (so it can look at
what the pod has cached); if it says split, the ``prefill`` profile picks the prefill pod. prefill-first: the
``prefill`` profile runs first (no decider, as in the reference), then ``decode`` (``PEER_ENDPOINT`` holds the
prefill pick for topology-aware decode plugins). The decode pod is the routing destination; the prefill pod goes
upstream in ``x-prefiller-host-port: ip:port`` (absent when not split, when no prefill pod is available — the
decode pod then prefills locally — or when both picks are the same pod). The server strips that header from
every client request (it is in ``owned_headers``).

Encode stage (E/PD, E/P/D; the reference's ``deciders.encode``, e.g. ``always-disagg-multimodal-decider``): in
decode-first order it runs after decode (its decider is asked with the decode pod) and before prefill; in
prefill-first order after prefill (decider asked with no pod). Every target of the ``encode`` profile goes upstream
in ``x-encoder-hosts-ports: ip:port,ip:port``, for a decode-side sidecar that runs the encode leg (llm-d's does;
extproc's pd-sidecar does not yet, so with it the decode vLLM encodes the media itself).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.contract import ENCODER_HEADER, PREFILLER_HEADER
from extproc.plugin import (
    PD_STAGE,
    PD_STAGE_DECODE,
    PD_STAGE_ENCODE,
    PD_STAGE_PREFILL,
    PEER_ENDPOINT,
    CycleState,
    Decider,
    InferenceRequest,
    PluginContext,
    ProfileResults,
    SchedulingProfile,
    SchedulingResult,
    check_keys,
    get_mapping,
    register,
)

log = logging.getLogger(__name__)

PREFILL_HEADER = PREFILLER_HEADER
DECODE_FIRST = "decode-first"
PREFILL_FIRST = "prefill-first"


def parse_stage_order(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"parameter 'stageOrder' must be a string, got {value!r}")
    v = value.lower().replace("-", "").replace("_", "")
    if v in ("", "decodefirst", "decode"):
        return DECODE_FIRST
    if v in ("prefillfirst", "prefill"):
        return PREFILL_FIRST
    raise ValueError(f"parameter 'stageOrder' must be {DECODE_FIRST} or {PREFILL_FIRST}, got {value!r}")


@register
class DisaggProfileHandler:
    type_name: ClassVar[str] = "disagg-profile-handler"
    owned_headers: ClassVar[tuple[str, ...]] = (PREFILL_HEADER, ENCODER_HEADER)
    __slots__ = (
        "name", "decode_profile", "prefill_profile", "decider_name", "stage_order", "decider", "_plugins", "splits",
        "encode_profile", "encode_decider_name", "encode_decider", "encodes",
    )  # fmt: skip

    def __init__(
        self,
        name: str = "disagg-profile-handler",
        decode_profile: str = "decode",
        prefill_profile: str = "prefill",
        decider: Decider | None = None,
        stage_order: str = DECODE_FIRST,
        decider_name: str = "",
        plugins: Mapping[str, Any] | None = None,
        encode_profile: str = "encode",
        encode_decider_name: str = "",
    ) -> None:
        self.name = name
        self.decode_profile = decode_profile
        self.prefill_profile = prefill_profile
        self.decider = decider
        self.decider_name = decider_name
        self.stage_order = parse_stage_order(stage_order)
        self._plugins = plugins
        self.splits = 0  # requests sent with a prefill pod
        self.encode_profile = encode_profile
        self.encode_decider_name = encode_decider_name
        self.encode_decider: Decider | None = None
        self.encodes = 0  # requests sent with encoder pods

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "DisaggProfileHandler":
        legacy = ("decodeProfile", "prefillProfile", "prefillDeciderPluginName", "deciderPluginName")
        check_keys(params, ("profiles", "deciders", "stageOrder", *legacy))
        nested = any(k in params for k in ("profiles", "deciders"))
        flat = [k for k in legacy if k in params]
        if nested and flat:
            raise ValueError(f"use either 'profiles'/'deciders' or the deprecated flat parameters, not both ({', '.join(flat)})")
        profiles = get_mapping(params, "profiles")
        deciders = get_mapping(params, "deciders")
        check_keys(profiles, ("decode", "prefill", "encode"))
        check_keys(deciders, ("prefill", "encode"))
        encode = profiles.get("encode") or "encode"
        encode_decider = deciders.get("encode") or ""
        if flat:
            log.warning("disagg-profile-handler: deprecated flat parameters; use profiles/deciders", extra={"plugin": name})
            decode = params.get("decodeProfile") or "decode"
            prefill = params.get("prefillProfile") or "prefill"
            decider = params.get("prefillDeciderPluginName") or params.get("deciderPluginName") or ""
        else:
            decode = profiles.get("decode") or "decode"
            prefill = profiles.get("prefill") or "prefill"
            decider = deciders.get("prefill") or ""
        for key, v in (("decode", decode), ("prefill", prefill), ("deciders.prefill", decider), ("encode", encode), ("deciders.encode", encode_decider)):
            if not isinstance(v, str):
                raise TypeError(f"parameter '{key}' must be a string, got {v!r}")
        order = parse_stage_order(params.get("stageOrder", DECODE_FIRST))
        if order == PREFILL_FIRST and decider:
            raise ValueError(f"a prefill decider is not supported with stageOrder {PREFILL_FIRST}")
        return cls(name, decode, prefill, None, order, decider, ctx.plugins, encode, encode_decider)

    def configure(self, profiles: dict[str, SchedulingProfile]) -> None:
        if self.decode_profile not in profiles:
            raise ValueError(f"decode profile '{self.decode_profile}' is not configured ({', '.join(profiles)})")
        if self.decider_name:
            p = (self._plugins or {}).get(self.decider_name)
            if p is None:
                raise ValueError(f"deciders.prefill names plugin '{self.decider_name}', which is not defined")
            if not isinstance(p, Decider):
                raise ValueError(f"deciders.prefill plugin '{self.decider_name}' is not a decider (no disaggregate method)")
            self.decider = p
        if self.encode_decider_name:
            p = (self._plugins or {}).get(self.encode_decider_name)
            if p is None:
                raise ValueError(f"deciders.encode names plugin '{self.encode_decider_name}', which is not defined")
            if not isinstance(p, Decider):
                raise ValueError(f"deciders.encode plugin '{self.encode_decider_name}' is not a decider (no disaggregate method)")
            if self.encode_profile not in profiles:
                raise ValueError(f"encode profile '{self.encode_profile}' is not configured ({', '.join(profiles)})")
            self.encode_decider = p
        if (self.decider is not None or self.stage_order == PREFILL_FIRST) and self.prefill_profile not in profiles:
            raise ValueError(f"prefill profile '{self.prefill_profile}' is not configured ({', '.join(profiles)})")
        if self.decider is None and self.stage_order == DECODE_FIRST:
            log.info("disagg-profile-handler: no deciders.prefill, P/D disaggregation off", extra={"plugin": self.name})

    def pick_profiles(
        self, cycle: CycleState, request: InferenceRequest, profiles: dict[str, SchedulingProfile], results: ProfileResults
    ) -> list[SchedulingProfile]:
        dname, pname, ename = self.decode_profile, self.prefill_profile, self.encode_profile
        # PD_STAGE tells stage-aware plugins (the latency predictor) which leg the profile's candidates serve
        if self.stage_order == PREFILL_FIRST:
            if pname not in results:
                cycle.set(PD_STAGE, PD_STAGE_PREFILL)
                return [profiles[pname]]
            if self.encode_decider is not None and ename not in results:
                if self.encode_decider.disaggregate(cycle, request, None):
                    cycle.set(PD_STAGE, PD_STAGE_ENCODE)
                    return [profiles[ename]]
                results[ename] = None  # evaluated: no encode stage
            if dname not in results:
                pres = results[pname]
                if pres is not None and pres.targets:
                    cycle.set(PEER_ENDPOINT, pres.targets[0])
                    cycle.set(PD_STAGE, PD_STAGE_DECODE)
                else:
                    cycle.data.pop(PD_STAGE, None)  # no prefill pod: the decode pod prefills itself
                return [profiles[dname]]
            return []
        if dname not in results:
            if self.decider is not None:
                # decode-first: the decider has not spoken yet; the decode pod is ranked as the decode leg of a
                # split request (the predictor relabels the row when the request was not split after all)
                cycle.set(PD_STAGE, PD_STAGE_DECODE)
            return [profiles[dname]]
        dres = results[dname]
        if dres is None or not dres.targets:
            return []
        decode_pod = dres.targets[0]
        if self.encode_decider is not None and ename not in results:
            if self.encode_decider.disaggregate(cycle, request, decode_pod):
                cycle.set(PD_STAGE, PD_STAGE_ENCODE)
                return [profiles[ename]]
            results[ename] = None  # evaluated: no encode stage
        if self.decider is None or pname in results:
            return []
        if self.decider.disaggregate(cycle, request, decode_pod):
            cycle.set(PEER_ENDPOINT, decode_pod)
            cycle.set(PD_STAGE, PD_STAGE_PREFILL)
            return [profiles[pname]]
        results[pname] = None  # evaluated: no split
        return []

    def process_results(self, cycle: CycleState, request: InferenceRequest, results: ProfileResults) -> SchedulingResult:
        kept = {k: v for k, v in results.items() if v is not None}
        out = SchedulingResult(kept, self.decode_profile)
        dres = kept.get(self.decode_profile)
        pres = kept.get(self.prefill_profile)
        if dres is not None and dres.targets and pres is not None and pres.targets:
            p = pres.targets[0]
            if p.address != dres.targets[0].address:
                out.headers[PREFILL_HEADER] = p.address
                self.splits += 1
        eres = kept.get(self.encode_profile) if self.encode_decider is not None else None
        if dres is not None and dres.targets and eres is not None and eres.targets:
            out.headers[ENCODER_HEADER] = ",".join(e.address for e in eres.targets)
            self.encodes += 1
        return out
