"""The server starts the shared services a config's plugins registered (here the latency predictor, a
``Service``) before it serves, leaves settings and the scraper to their owners, and stops them on shutdown."""

from __future__ import annotations

from extproc.datalayer.scrape import SCRAPER
from extproc.predictor.service import SERVICE_KEY, STATE_DIR_KEY, PredictorService
from extproc.server.app import SchedulerServer, ServeOptions
from extproc.services import Services

PODS = ["127.0.0.1:1", "127.0.0.1:2"]


async def test_predictor_service_started_and_stopped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = SchedulerServer(ServeOptions(endpoints=PODS, models=["m"], host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0,
                                     scrape_interval_s=3600, config="predicted-latency", predictor_state_dir=str(tmp_path)))
    assert isinstance(s.services, Services) and s.services.get(STATE_DIR_KEY) == str(tmp_path)
    await s.start()
    try:
        svc = s.services.get(SERVICE_KEY)
        assert isinstance(svc, PredictorService) and svc.trainer is not None  # started by the registry
        names = [n for n, _ in s.services.background(skip=(s.services.get(SCRAPER),))]
        assert names == [SERVICE_KEY]
    finally:
        await s.stop()
    assert svc.trainer is None  # stopped
    assert s.services.background(skip=(s.scraper,))  # still registered, no longer running
