"""``request-attribute-reporter``: report values computed from the response's ``usage`` object back to the proxy as
ext_proc dynamic metadata (e.g. a request cost for Envoy's rate limiting).

Reference: llm-d-router pkg/epp/framework/plugins/requestcontrol/requestattributereporter. ``attributes`` is a
non-empty list of ``{key: {namespace (default envoy.lb), name}, expression, condition?}``; ``expression`` (must give
an integer) and ``condition`` (must give a boolean) are CEL over ``usage`` (``usage.prompt_tokens``,
``usage.completion_tokens``, ``usage.total_tokens``, ...), compiled at load — a syntax error is a ConfigError.
Evaluated once per request when its response body ends, off the decision path; needs the server's
``--response-observe streamed`` (the routing stream sees the body; checked at start-up). A condition that is false,
or an expression that fails or is not an integer, reports nothing for that attribute (logged). CEL is
cel-python (``pip install 'extproc[cel]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.contract import LB_METADATA_NAMESPACE
from extproc.plugin import InferenceRequest, PluginContext, check_keys, get_mapping, get_str, register

log = logging.getLogger(__name__)


def _compile(env: Any, text: str, what: str) -> Any:
    try:
        return env.program(env.compile(text))
    except Exception as e:  # celpy raises CELParseError / CELEvalError subclasses
        raise ValueError(f"{what}: invalid CEL {text.strip()!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@register
class RequestAttributeReporter:
    type_name: ClassVar[str] = "request-attribute-reporter"
    __slots__ = ("name", "attributes", "_to_cel", "_bool")

    def __init__(self, name: str, attributes: list[tuple[str, str, Any, Any]], to_cel: Any, bool_type: type = bool) -> None:
        self.name = name
        self.attributes = attributes  # (namespace, key, expression program, condition program | None)
        self._to_cel = to_cel
        self._bool = bool_type  # CEL's boolean type (an int subclass in cel-python)

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "RequestAttributeReporter":
        check_keys(params, ("attributes",))
        raw = params.get("attributes")
        if not isinstance(raw, list) or not raw:
            raise ValueError("parameter 'attributes' must be a non-empty list of {key, expression, condition}")
        try:
            import celpy
        except ImportError:
            raise ValueError("CEL support is not installed: pip install 'extproc[cel]' (cel-python)") from None
        env = celpy.Environment()
        attrs: list[tuple[str, str, Any, Any]] = []
        for i, a in enumerate(raw):
            if not isinstance(a, Mapping):
                raise TypeError(f"attributes[{i}] must be a mapping with key, expression and optional condition")
            check_keys(a, ("key", "expression", "condition"))
            key = get_mapping(a, "key")
            check_keys(key, ("namespace", "name"))
            ns = get_str(key, "namespace", LB_METADATA_NAMESPACE)
            kname = get_str(key, "name", "")
            expr = _compile(env, get_str(a, "expression", ""), f"attributes[{i}].expression")
            cond = _compile(env, get_str(a, "condition", ""), f"attributes[{i}].condition") if a.get("condition") else None
            attrs.append((ns, kname, expr, cond))
        return cls(name, attrs, celpy.json_to_cel, celpy.celtypes.BoolType)

    def report(self, request: InferenceRequest, usage: dict[str, Any]) -> list[tuple[str, str, Any]]:
        activation = self._to_cel({"usage": usage})
        out: list[tuple[str, str, Any]] = []
        for ns, key, expr, cond in self.attributes:
            try:
                if cond is not None and not bool(cond.evaluate(activation)):
                    continue
                value = expr.evaluate(activation)
            except Exception as e:
                log.info("attribute not reported: CEL evaluation failed", extra={"plugin": self.name, "key": key, "error": str(e)[:200]})
                continue
            if isinstance(value, (bool, self._bool)) or not isinstance(value, int):
                log.info("attribute not reported: expression did not give an integer", extra={"plugin": self.name, "key": key})
                continue
            out.append((ns, key, int(value)))
        return out
