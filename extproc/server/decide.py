"""The decision steps of the request path, written once: the ext_proc handler (``server/handler.py``) and the
virtual benchmark's gateway (``extproc.bench.virtual``) both call them, in this order, on a parsed request:

1. :func:`model_error` — a target model no known endpoint serves is a 404 (``model_not_found``);
2. :func:`shed_error` — a sheddable request (priority < 0) gets a 429 (``saturated``) while the model's pods are
   saturated, or while flow control holds queued (higher-priority) work;
3. (server only) flow control may hold the request until a slot frees;
4. :func:`schedule_and_dispatch` — ``Scheduler.schedule``, the tracker's ``dispatch`` with the chosen pod's
   predictor feature row and, for a P/D split, the prefill pod (``x-prefiller-host-port`` in the result's
   headers, accounted until its leg ends) with its own feature row, then ``Scheduler.dispatched`` (pre-request
   plugins).

Each step returns (or raises) a ``SchedulingError`` carrying the client's HTTP status; its ``error_type`` is the
OpenAI error ``type`` — the one mapping from status to error type.
"""

from __future__ import annotations

from extproc.scheduling.reservation import BatchReservation
from extproc.admission.saturation import SaturationDetector
from extproc.api import InferenceRequest
from extproc.contract import PREFILLER_HEADER
from extproc.datalayer.endpoint import Endpoint, EndpointPool
from extproc.scheduling.framework import (
    PREDICTOR_FEATURES,
    PREDICTOR_PREFILL_FEATURES,
    CycleState,
    Scheduler,
    SchedulingError,
    SchedulingResult,
)
from extproc.server.tracker import Flight, FlightTracker

SHED_MESSAGE = "the fleet is saturated and this request is sheddable (priority < 0)"


def model_error(pool: EndpointPool, request: InferenceRequest) -> SchedulingError | None:
    """A 404 when no known endpoint (healthy or not) serves the request's target model."""
    model = request.target_model
    if model in pool.known_models():
        return None
    return SchedulingError(404, f"The model `{model}` does not exist.", "model_not_found")


def batch_candidates(pool: EndpointPool, model: str, reservation: BatchReservation | None) -> list[Endpoint]:
    """The pods of ``model`` the batch band may use: all of them, or without the reserved ones
    (``batch-reserve-filter``, :mod:`extproc.scheduling.reservation`)."""
    pods = [e for e in pool.snapshot() if model in e.models]
    return reservation.batch_pods(pods) if reservation is not None else pods


def shed_error(
    pool: EndpointPool,
    saturation: SaturationDetector,
    request: InferenceRequest,
    queued: bool = False,
    reservation: BatchReservation | None = None,
) -> SchedulingError | None:
    """A 429 for a sheddable request while ``queued`` (flow control holds waiting work: a freed slot belongs to
    it) or while the pods serving its model that the batch band may use (``reservation``) are saturated."""
    if not request.sheddable:
        return None
    if queued or saturation.saturated(batch_candidates(pool, request.target_model, reservation)):
        return SchedulingError(429, SHED_MESSAGE, "saturated")
    return None


def schedule_and_dispatch(
    scheduler: Scheduler,
    tracker: FlightTracker,
    pool: EndpointPool,
    request: InferenceRequest,
    allowed: frozenset[str] | None = None,
) -> tuple[Flight, SchedulingResult, CycleState]:
    """Pick the pod(s), account the flight, run the pre-request plugins. Raises ``SchedulingError``."""
    result, cycle = scheduler.schedule(request, allowed=allowed)
    primary = result.primary
    feats = cycle.data.get(PREDICTOR_FEATURES)
    paddr = result.headers.get(PREFILLER_HEADER) if result.headers else None
    prefill = pool.get(paddr) if paddr else None
    pfeats = cycle.data.get(PREDICTOR_PREFILL_FEATURES) if prefill is not None else None
    flight = tracker.dispatch(
        request,
        primary,
        feats.get(primary.address) if isinstance(feats, dict) else None,
        prefill,
        pfeats.get(prefill.address) if isinstance(pfeats, dict) and prefill is not None else None,
    )
    scheduler.dispatched(cycle, request, result)
    return flight, result, cycle
