"""Deterministic local tokenizer for the simulator (no downloads, no vocabulary files).

It lives in the product (the ``sim`` tokenizer kind of :mod:`extproc.datalayer.tokenize`, so precise routing
works against a simulated fleet) and the simulator imports it from here: the product never imports the lab.

Text is cut on word / punctuation / whitespace boundaries with one regular expression: a word piece is
at most four word characters with an optional leading space (so a long word becomes several 4-character
chunks), punctuation runs are at most four characters, other whitespace runs are one piece. Each piece is
hashed with xxhash into a 32k vocabulary, which gives about four characters per token on English text and
the same ids for the same text in every process. A bounded reverse map remembers the text of every piece it
has seen, so ``decode`` round-trips text that was encoded here; ids never seen decode to ``<id>``.

Chat messages are rendered with a fixed template (``<|role|>`` markers, one special id each) so the same
conversation always gives the same ids, and a shared system prompt is a shared token prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

__all__ = [
    "VOCAB_SIZE",
    "OUTPUT_WORDS",
    "SimTokenizer",
    "get_tokenizer",
]

VOCAB_SIZE = 32_000
_NUM_SPECIAL = 16
_SPECIALS = ("<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
_PIECE_RE = re.compile(r" ?\w{1,4}| ?[^\w\s]{1,4}|\s+")
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in _SPECIALS))

# Words the simulated model "generates": output ids are drawn from the ids of these pieces, so generated
# text decodes to readable words.
OUTPUT_WORDS: tuple[str, ...] = tuple(
    " " + w
    for w in (
        "the of and to in is was for on are as with his they at be this from have or by one had not but what "
        "all were when we there can an your which their said if do will each about how up out them then she "
        "many some so these would other into has more her two like him see time could no make than first been "
        "its who now people my made over did down only way find use may water long little very after words "
        "call just where most know get through back much before go good new write our used me man too any day "
        "same right look think also around another came come work three word must because does part even place "
        "well such here take why things help put years different away again off went old number great tell men "
        "say small every found still between name should home big give air line set own under read last never "
        "us left end along while might next sound below saw something thought both few those always looked show "
        "large often together asked house world going want school important until form food keep children feet "
        "land side without boy once animals life enough took sometimes four head above kind began almost live "
        "page got earth need far hand high year mother light parts country father let night following picture "
        "being study second eyes soon times story boys since white days ever paper hard near sentence better "
        "best across during today others however sure means knew try told young miles sun ways thing whole hear "
        "example heard several change answer room sea against top turned learn point city play toward five "
        "using himself usually"
    ).split()
)

_MAX_REVERSE = 1 << 18


class SimTokenizer:
    """Deterministic, process-independent tokenizer. Thread-compatible (no shared mutable state beyond caches)."""

    __slots__ = ("_piece_ids", "_reverse", "_output_ids", "_special_ids")

    def __init__(self) -> None:
        self._piece_ids: dict[str, int] = {}
        self._reverse: dict[int, str] = {}
        self._special_ids: dict[str, int] = {s: i for i, s in enumerate(_SPECIALS)}
        for s, i in self._special_ids.items():
            self._reverse[i] = s
        self._output_ids: tuple[int, ...] = tuple(self._piece_id(w) for w in OUTPUT_WORDS)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def eos_token_id(self) -> int:
        return self._special_ids["<|eos|>"]

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        """Ids the simulated model samples from (each decodes to one readable word)."""
        return self._output_ids

    def _piece_id(self, piece: str) -> int:
        tid = self._piece_ids.get(piece)
        if tid is None:
            tid = _NUM_SPECIAL + xxhash.xxh32_intdigest(piece.encode("utf-8")) % (VOCAB_SIZE - _NUM_SPECIAL)
            if len(self._piece_ids) < _MAX_REVERSE:
                self._piece_ids[piece] = tid
                self._reverse.setdefault(tid, piece)
        return tid

    def _encode_plain(self, text: str, out: list[int]) -> None:
        pid = self._piece_id
        out.extend(pid(p) for p in _PIECE_RE.findall(text))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``<|...|>`` markers in the text map to their special ids."""
        out: list[int] = [self._special_ids["<|bos|>"]] if add_special_tokens else []
        if "<|" not in text:
            self._encode_plain(text, out)
            return out
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                self._encode_plain(text[pos : m.start()], out)
            out.append(self._special_ids[m.group(0)])
            pos = m.end()
        if pos < len(text):
            self._encode_plain(text[pos:], out)
        return out

    def token_text(self, token_id: int) -> str:
        text = self._reverse.get(token_id)
        return text if text is not None else f"<{token_id}>"

    def decode(self, token_ids: Iterable[int]) -> str:
        rev = self._reverse
        return "".join(rev.get(t) or f"<{t}>" for t in token_ids)

    def convert_ids_to_tokens(self, token_ids: Iterable[int]) -> list[str]:
        return [self.token_text(t) for t in token_ids]

    @staticmethod
    def render_chat(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The simulator's chat template: ``<|role|>\\ncontent<|end|>\\n`` per message, then ``<|assistant|>\\n``."""
        parts: list[str] = []
        for msg in messages:
            role = str(msg.get("role", "user"))
            content = msg.get("content", "")
            if isinstance(content, list):  # OpenAI content parts: keep the text parts in order
                content = "".join(
                    str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
                )
            elif content is None:
                content = ""
            marker = f"<|{role}|>" if f"<|{role}|>" in _SPECIALS else "<|user|>"
            parts.append(f"{marker}\n{content}<|end|>\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))


_DEFAULT: SimTokenizer | None = None


def get_tokenizer() -> SimTokenizer:
    """The process-wide tokenizer (its caches are shared by every simulated pod)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SimTokenizer()
    return _DEFAULT
