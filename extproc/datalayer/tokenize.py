"""Scheduler-side tokenization: the same token ids the model server will compute, so prefix lookups in the
KV-event index are exact.

Two kinds, configured per model:

* ``hf``: a LOCAL tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``, optionally
  ``chat_template.jinja``). Text goes through the HF ``tokenizers`` library; the chat template is rendered
  with jinja2 in an immutable sandbox with the options ``transformers`` uses (``trim_blocks``,
  ``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``, ``strftime_now``) — ``transformers``
  itself is not needed. As in vLLM's OpenAI server, chat prompts are rendered with
  ``add_generation_prompt`` (default true) and encoded WITHOUT special tokens (the template carries BOS);
  completion prompts are encoded WITH special tokens (the tokenizer's post-processor adds BOS).
* ``sim``: the simulator's deterministic tokenizer (``extproc.datalayer.simtokenizer``), so precise routing works
  against a simulated fleet.

A model may be declared a LoRA adapter of a base (``adapter_of``): it uses the base's tokenizer, and its
adapter name goes into the block keys (vLLM puts the LoRA name into its block hashes and its events).

Results are cached in an LRU keyed by xxh64 of (model, rendered text), so repeated prompts (retries,
benchmark loops, identical system+user turns) cost one hash. Returned lists are shared: do not mutate them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import xxhash

from extproc.api import API_CHAT, API_COMPLETIONS, InferenceRequest
from extproc.services import ServiceKey

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    def encode_text(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str: ...


def _special(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


class HFTokenizer:
    """A HF ``tokenizers`` tokenizer plus its chat template, from a local directory."""

    __slots__ = ("path", "_tok", "_template", "_bos", "_eos")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        d = Path(path)
        self.path = str(d)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{d}: no tokenizer.json (a local tokenizer directory is required)")
        self._tok = Tokenizer.from_file(str(tj))
        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        self._bos = _special(cfg.get("bos_token"))
        self._eos = _special(cfg.get("eos_token"))
        template: Any = cfg.get("chat_template")
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        self._template = None
        if isinstance(template, str) and template:

            def raise_exception(message: str) -> None:
                from jinja2.exceptions import TemplateError

                raise TemplateError(message)

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(template)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids  # type: ignore[no-any-return]

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        if self._template is None:
            raise ValueError(f"{self.path}: tokenizer has no chat template")
        ctx: dict[str, Any] = {"bos_token": self._bos, "eos_token": self._eos, "add_generation_prompt": True}
        ctx.update(kwargs)
        ctx["messages"] = messages
        return self._template.render(**ctx)


class SimTextTokenizer:
    """Adapter over the simulator's deterministic tokenizer (``extproc.datalayer.simtokenizer``)."""

    __slots__ = ("_tok",)

    def __init__(self) -> None:
        from extproc.datalayer.simtokenizer import get_tokenizer

        self._tok = get_tokenizer()

    def encode_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
        return self._tok.render_chat(messages, add_generation_prompt=bool(kwargs.get("add_generation_prompt", True)))


@dataclass(slots=True)
class ModelTokenizer:
    model: str
    tokenizer: TextTokenizer
    lora: str | None = None  # adapter name that goes into block keys
    add_special_tokens: bool = True  # for completions prompts (vLLM's default)


@dataclass(slots=True)
class TokenizeStats:
    calls: int = 0
    cache_hits: int = 0
    no_tokenizer: int = 0
    errors: int = 0


def _build(spec: Mapping[str, Any]) -> TextTokenizer:
    kind = spec.get("kind", "hf")
    if kind == "hf":
        path = spec.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("an 'hf' tokenizer needs 'path' (a local directory with tokenizer.json)")
        return HFTokenizer(path)
    if kind == "sim":
        return SimTextTokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'hf' or 'sim')")


# the per-model tokenizers of a server (the handler tokenizes once; precise scorers reuse the ids)
TOKENIZERS: ServiceKey[Tokenizers] = ServiceKey("tokenizers")


class Tokenizers:
    """Per-model tokenizers with an LRU of results. ``tokenize(request)`` → token ids, or None when no
    tokenizer is configured for the model (or the request cannot be tokenized): callers then fall back."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]] | None = None, *, cache_size: int = 4096) -> None:
        self.cache_size = cache_size
        self._models: dict[str, ModelTokenizer] = {}
        self._default: ModelTokenizer | None = None
        self._cache: OrderedDict[int, list[int]] = OrderedDict()
        # the last request answered and its answer: the handler tokenizes a request, then a precise scorer may ask
        # again (when the handler got None); the same request object is never tokenized — or failed — twice
        self._last_request: InferenceRequest | None = None
        self._last_ids: list[int] | None = None
        self.stats = TokenizeStats()
        specs = dict(specs or {})
        built: dict[str, TextTokenizer] = {}
        adapters: dict[str, str] = {}
        for model, spec in specs.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"tokenizer for model {model!r} must be a mapping")
            if "adapter_of" in spec:
                adapters[model] = str(spec["adapter_of"])
                continue
            built[model] = _build(spec)
            mt = ModelTokenizer(model, built[model], None, bool(spec.get("add_special_tokens", True)))
            if model == "*":
                self._default = mt
            else:
                self._models[model] = mt
        for model, base in adapters.items():
            bt = self._models.get(base) or (self._default if base == "*" else None)
            if bt is None:
                raise ValueError(f"adapter {model!r}: base model {base!r} has no tokenizer")
            self._models[model] = ModelTokenizer(model, bt.tokenizer, model, bt.add_special_tokens)

    def add(self, model: str, tokenizer: TextTokenizer, *, lora: str | None = None, add_special_tokens: bool = True) -> None:
        self._models[model] = ModelTokenizer(model, tokenizer, lora, add_special_tokens)

    def for_model(self, model: str) -> ModelTokenizer | None:
        return self._models.get(model) or self._default

    def __bool__(self) -> bool:
        return bool(self._models) or self._default is not None

    def _cached(self, model: str, text: str, encode: Callable[[], list[int]]) -> list[int]:
        h = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), xxhash.xxh3_64_intdigest(model.encode()))
        c = self._cache
        ids = c.get(h)
        if ids is not None:
            c.move_to_end(h)
            self.stats.cache_hits += 1
            return ids
        ids = encode()
        c[h] = ids
        if len(c) > self.cache_size:
            c.popitem(last=False)
        return ids

    def tokenize(self, request: InferenceRequest) -> list[int] | None:
        self.stats.calls += 1
        if request is self._last_request:
            self.stats.cache_hits += 1
            return self._last_ids
        ids = self._tokenize(request)
        self._last_request, self._last_ids = request, ids
        return ids

    def _tokenize(self, request: InferenceRequest) -> list[int] | None:
        mt = self.for_model(request.target_model)
        if mt is None:
            self.stats.no_tokenizer += 1
            return None
        tok = mt.tokenizer
        body = request.body
        try:
            if request.api == API_CHAT:
                kwargs: dict[str, Any] = {}
                ctk = body.get("chat_template_kwargs")
                if isinstance(ctk, dict):
                    kwargs.update(ctk)
                if "add_generation_prompt" in body:
                    kwargs["add_generation_prompt"] = bool(body["add_generation_prompt"])
                if body.get("tools") is not None:
                    kwargs["tools"] = body["tools"]
                text = tok.render_chat(body["messages"], **kwargs)
                return self._cached(mt.model, "c" + text, lambda: tok.encode_text(text, add_special_tokens=False))
            if request.api == API_COMPLETIONS:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and prompt:
                    first = prompt[0]
                    if isinstance(first, int) and not isinstance(first, bool):
                        return list(prompt)  # already token ids
                    if isinstance(first, list):
                        return list(first)  # batch of token-id prompts: route by the first
                    prompt = first  # batch of strings: route by the first
                if not isinstance(prompt, str):
                    return None
                add = mt.add_special_tokens
                return self._cached(mt.model, ("s" if add else "n") + prompt, lambda: tok.encode_text(prompt, add_special_tokens=add))
            # embeddings / responses: tokenize the request's text as a completion would
            text = request.prompt_text
            return self._cached(mt.model, "t" + text, lambda: tok.encode_text(text, add_special_tokens=mt.add_special_tokens))
        except Exception as e:  # a template error must not fail the request: fall back to approximate scoring
            self.stats.errors += 1
            log.warning("tokenization failed; falling back", extra={"model": request.target_model, "error": str(e)[:200]})
            return None

    def lora_of(self, model: str) -> str | None:
        mt = self.for_model(model)
        return mt.lora if mt is not None else None
