"""The shared-service registry: the objects one server (or one virtual run) shares between the config loader,
the plugins, the request handler and the metrics, by typed key, and the lifecycle of those that run in the
background.

* :class:`ServiceKey` — a typed key, declared once next to the type it names
  (``PREFIX_INDEX: ServiceKey[PrefixIndex] = ServiceKey("prefix_index")``); it is a ``str``, so the registry
  reads like a mapping, and ``services.get(KEY)`` is typed.
* :class:`Service` — what a background service is: ``async start()`` and ``async stop()``. The server starts every
  registered :class:`Service` before it serves (:meth:`Services.start_all`) and stops them in reverse order on
  shutdown (:meth:`Services.stop_all`); nothing else is started or stopped, and nothing by attribute lookup.
* :class:`Services` — the registry. Settings the server passes to plugins (e.g. the predictor's state directory)
  are entries too; they are plain values, not services.

It sits in the lowest layer (it imports nothing of the product), so the data layer, the predictor and the
scheduling plugins can all register and read services.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any, Generic, Protocol, TypeVar, overload, runtime_checkable

log = logging.getLogger(__name__)

T = TypeVar("T")


class ServiceKey(str, Generic[T]):
    """A typed key of :class:`Services` (a ``str``: plain string keys still work)."""

    __slots__ = ()


@runtime_checkable
class Service(Protocol):
    """A shared background service (e.g. the KV-event manager, the latency predictor): the server awaits
    ``start()`` before serving and ``stop()`` on shutdown."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def is_service(obj: Any) -> bool:
    """``obj`` satisfies :class:`Service` with a coroutine ``start`` (a synchronous ``start`` is not awaited)."""
    return isinstance(obj, Service) and inspect.iscoroutinefunction(obj.start)


class Services(dict[str, Any]):
    """Shared objects by name; see the module docstring."""

    __slots__ = ("_started",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started: list[tuple[str, Service]] = []

    @overload  # type: ignore[override]
    def get(self, key: ServiceKey[T]) -> T | None: ...
    @overload
    def get(self, key: ServiceKey[T], default: T) -> T: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, default)

    def background(self, skip: Iterable[object] = ()) -> list[tuple[str, Service]]:
        """The registered background services in registration order, except the objects in ``skip``."""
        skipped = [id(s) for s in skip]
        return [(name, svc) for name, svc in self.items() if is_service(svc) and id(svc) not in skipped]

    async def start_all(self, skip: Iterable[object] = ()) -> None:
        """Start every background service (but those in ``skip``, which their owner starts) in registration
        order; a failing start stops the ones already started and raises."""
        for name, svc in self.background(skip):
            try:
                await svc.start()
            except BaseException:
                await self.stop_all()
                raise
            self._started.append((name, svc))
            log.info("service started", extra={"service": name})

    async def stop_all(self) -> None:
        """Stop the services :meth:`start_all` started, newest first; a failing stop is logged, not raised."""
        while self._started:
            name, svc = self._started.pop()
            try:
                await svc.stop()
            except Exception:
                log.warning("service stop failed", extra={"service": name}, exc_info=True)
