"""Label filters: keep candidate pods by their labels (llm-d-router pkg/epp/framework/plugins/scheduling/filter/bylabel).

Labels come from the pod (Kubernetes discovery copies pod labels) or, for static endpoints, from the endpoints
file (``--endpoints-file``, see docs/plugins.md). The role label is ``llm-d.ai/role``.

- ``decode-filter``: role in {decode, prefill-decode, both, encode-prefill-decode}; pods **without** the label are
  kept too (an unlabelled fleet is an aggregated fleet).
- ``prefill-filter``: role in {prefill, encode-prefill, prefill-decode, both, encode-prefill-decode}; unlabelled
  pods are dropped.
- ``encode-filter``: role in {encode, encode-prefill, encode-prefill-decode}; unlabelled pods are dropped.
- ``by-label`` (deprecated in the reference, accepted): ``label``, ``validValues``, ``allowsNoLabel``.
- ``label-selector-filter`` (alias ``by-label-selector``): a Kubernetes label selector, ``matchLabels`` (all must
  match) and ``matchExpressions`` (``key``, ``operator`` In | NotIn | Exists | DoesNotExist, ``values``). An empty
  selector keeps every pod, as Kubernetes' does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import CycleState, Endpoint, InferenceRequest, PluginContext, check_keys, get_bool, get_str, get_str_list, register

ROLE_LABEL = "llm-d.ai/role"
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class _LabelValueFilter:
    """Keeps pods whose ``label`` is one of ``values``; pods lacking the label are kept iff ``allows_no_label``."""

    type_name: ClassVar[str] = ""
    __slots__ = ("name", "label", "values", "allows_no_label")

    def __init__(self, name: str, label: str, values: frozenset[str], allows_no_label: bool) -> None:
        self.name = name
        self.label = label
        self.values = values
        self.allows_no_label = allows_no_label

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        label, values, allow = self.label, self.values, self.allows_no_label
        out = []
        for e in candidates:
            v = e.labels.get(label)
            if (v is None and allow) or (v is not None and v in values):
                out.append(e)
        return out


@register
class ByLabelFilter(_LabelValueFilter):
    type_name: ClassVar[str] = "by-label"
    __slots__ = ()

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "ByLabelFilter":
        check_keys(params, ("label", "validValues", "allowsNoLabel"))
        label = get_str(params, "label", "")  # required: '' is rejected by get_str
        values = frozenset(get_str_list(params, "validValues"))
        allow = get_bool(params, "allowsNoLabel", False)
        if not values and not allow:
            raise ValueError("either 'validValues' must be non-empty or 'allowsNoLabel' must be true")
        return cls(name, label, values, allow)


def _role_filter(type_name: str, roles: frozenset[str], allows_no_label: bool) -> type:
    class RoleFilter(_LabelValueFilter):
        __slots__ = ()

        def __init__(self, name: str = type_name) -> None:
            super().__init__(name, ROLE_LABEL, roles, allows_no_label)

        @classmethod
        def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "RoleFilter":
            check_keys(params, ())
            return cls(name)

    RoleFilter.type_name = type_name
    RoleFilter.__name__ = RoleFilter.__qualname__ = "".join(p.title() for p in type_name.split("-"))
    return register(RoleFilter)


DecodeFilter = _role_filter("decode-filter", DECODE_ROLES, True)
PrefillFilter = _role_filter("prefill-filter", PREFILL_ROLES, False)
EncodeFilter = _role_filter("encode-filter", ENCODE_ROLES, False)

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@register
class LabelSelectorFilter:
    type_name: ClassVar[str] = "label-selector-filter"
    __slots__ = ("name", "match_labels", "expressions")

    def __init__(self, name: str, match_labels: Mapping[str, str], expressions: list[tuple[str, str, frozenset[str]]]) -> None:
        self.name = name
        self.match_labels = dict(match_labels)
        self.expressions = expressions

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "LabelSelectorFilter":
        check_keys(params, ("matchLabels", "matchExpressions"))
        ml = params.get("matchLabels") or {}
        if not isinstance(ml, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ml.items()):
            raise TypeError(f"parameter 'matchLabels' must map label names to string values, got {ml!r}")
        exprs: list[tuple[str, str, frozenset[str]]] = []
        raw = params.get("matchExpressions") or []
        if not isinstance(raw, list):
            raise TypeError("parameter 'matchExpressions' must be a list")
        for i, x in enumerate(raw):
            if not isinstance(x, Mapping):
                raise TypeError(f"matchExpressions[{i}] must be a mapping with key, operator, values")
            check_keys(x, ("key", "operator", "values"))
            key = get_str(x, "key", "")
            op = get_str(x, "operator", "")
            if op not in _OPERATORS:
                raise ValueError(f"matchExpressions[{i}]: operator must be one of {', '.join(_OPERATORS)}, got {op!r}")
            values = frozenset(get_str_list(x, "values"))
            if op in ("In", "NotIn") and not values:
                raise ValueError(f"matchExpressions[{i}]: operator {op} needs non-empty 'values'")
            if op in ("Exists", "DoesNotExist") and values:
                raise ValueError(f"matchExpressions[{i}]: operator {op} takes no 'values'")
            exprs.append((key, op, values))
        return cls(name, ml, exprs)

    def _matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for key, op, values in self.expressions:
            v = labels.get(key)
            if op == "In":
                if v is None or v not in values:
                    return False
            elif op == "NotIn":
                if v is not None and v in values:
                    return False
            elif op == "Exists":
                if v is None:
                    return False
            elif v is not None:  # DoesNotExist
                return False
        return True

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        return [e for e in candidates if self._matches(e.labels)]


@register
class ByLabelSelectorFilter(LabelSelectorFilter):
    """Deprecated reference name of ``label-selector-filter``."""

    type_name: ClassVar[str] = "by-label-selector"
    __slots__ = ()
