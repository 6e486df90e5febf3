"""A tiny, fully local Llama model directory for real-vLLM tests and calibration.

``build_tiny_model(dir)`` writes a ``LlamaForCausalLM`` ``config.json`` (hidden 128, 2 layers, 4 heads of
dim 32; vLLM's CPU attention supports head_dim 32) plus a byte-level BPE tokenizer trained here with the
``tokenizers`` library on a deterministic generated corpus. vLLM serves it with ``--load-format dummy``
(random weights, no checkpoint), and ``transformers.AutoTokenizer`` loads it offline. Nothing is ever
downloaded. The same directory is what the precise-prefix scorer and load generators tokenize with, so
their token ids match what the engine sees.

The output is byte-for-byte deterministic: the corpus comes from a fixed-seed SplitMix64 generator (not
``random``, whose algorithms may change between Python versions) and every JSON file is written with
sorted keys.

CLI: ``python -m extproc.sim.tiny_model DIR [--vocab-size N] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

BOS_TOKEN: Final = "<s>"
EOS_TOKEN: Final = "</s>"
PAD_TOKEN: Final = "<pad>"
IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"
SPECIAL_TOKENS: Final[tuple[str, ...]] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

DEFAULT_VOCAB_SIZE: Final = 3072
MAX_POSITION_EMBEDDINGS: Final = 2048
CORPUS_SEED: Final = 0x5EED_7111
CORPUS_SENTENCES: Final = 12_000

# ChatML-style template. String content is the common case; list content (OpenAI "parts") is joined from
# its text parts so both request shapes render.
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The files build_tiny_model writes; all of them together make a complete model directory.
MODEL_FILES: Final[tuple[str, ...]] = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

_WORDS: Final[tuple[str, ...]] = tuple(
    """
    the of and to in is that for it as was with be by on not he this are or his from at which but have an
    they you were her she there been one all we their has would when if so no will more can said who what
    about up out them into some time could other than then its only two may these first new any like our
    over such after also did many before must through back where most years much way well down should
    because each just those people how too little state good very make world still own see men work long
    get here between both life being under never day same another know while last might us great old year
    off come since against go came right used take three small large request server model token cache
    prefix latency queue batch decode prefill schedule endpoint pod gateway route envoy metric score filter
    picker load balance kv block memory thread core engine stream chat completion prompt answer question
    data value table list string number function return class import python system user assistant help
    please thanks explain summarize write code test error result output input file path config default
    """.split()
)
_PUNCT: Final[tuple[str, ...]] = (".", ".", ".", ",", ",", "?", "!", ":", ";")
_SYMBOLS: Final[tuple[str, ...]] = ("(", ")", "[", "]", "{", "}", "=", "+", "-", "*", "/", "_", "#", "'", '"')


class _SplitMix64:
    """SplitMix64: tiny, fast, and fully specified, so the corpus never depends on the Python version."""

    __slots__ = ("_state",)

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self._state = seed & self._MASK

    def next_u64(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next_u64() % n

    def choice(self, seq: tuple[str, ...]) -> str:
        return seq[self.below(len(seq))]


def corpus(seed: int = CORPUS_SEED, sentences: int = CORPUS_SENTENCES) -> Iterator[str]:
    """Yield deterministic pseudo-text lines: words, numbers, punctuation, code-like symbols, chat markup."""
    rng = _SplitMix64(seed)
    for i in range(sentences):
        n = 4 + rng.below(14)
        parts: list[str] = []
        for _ in range(n):
            r = rng.below(100)
            if r < 80:
                w = rng.choice(_WORDS)
                parts.append(w.capitalize() if not parts and rng.below(2) else w)
            elif r < 88:
                parts.append(str(rng.below(10 ** (1 + rng.below(4)))))
            elif r < 94:
                parts.append(rng.choice(_WORDS) + rng.choice(_SYMBOLS) + rng.choice(_WORDS))
            else:
                parts.append(rng.choice(_SYMBOLS))
        line = " ".join(parts) + rng.choice(_PUNCT)
        if i % 7 == 0:
            role = ("user", "assistant", "system")[rng.below(3)]
            line = f"{IM_START}{role}\n{line}{IM_END}"
        yield line


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Train the byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) on the generated corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Completions get a leading BOS like Llama; chat prompts carry it in the template and vLLM encodes
    # them with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """The ``config.json`` of the tiny LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def is_complete(directory: str | os.PathLike[str]) -> bool:
    d = Path(directory)
    return all((d / name).is_file() for name in MODEL_FILES)


def build_tiny_model(
    directory: str | os.PathLike[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, force: bool = False
) -> Path:
    """Write the tiny model directory (config + tokenizer) and return its path.

    Re-running on a complete directory is a no-op unless ``force``; files are written to a temporary name
    and renamed, so a concurrent reader never sees a half-written file.
    """
    d = Path(directory).resolve()
    if is_complete(d) and not force:
        return d
    d.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))

    staged: dict[str, str] = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
    }
    tmp_paths: list[tuple[Path, Path]] = []
    for name, text in staged.items():
        tmp = d / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp_paths.append((tmp, d / name))
    json_files: dict[str, dict[str, Any]] = {
        "config.json": model_config(vocab, bos_id, eos_id, pad_id),
        "generation_config.json": {
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        "special_tokens_map.json": {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [IM_START, IM_END],
        },
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [IM_START, IM_END],
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    }
    for name, obj in json_files.items():
        tmp = d / f".{name}.tmp"
        _write_json(tmp, obj)
        tmp_paths.append((tmp, d / name))
    for tmp, final in tmp_paths:
        tmp.replace(final)
    logger.info("tiny model written to %s (vocab %d)", d, vocab)
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.sim.tiny_model",
        description="Write a tiny local LlamaForCausalLM config + trained BPE tokenizer (no downloads).",
    )
    parser.add_argument("directory", help="output directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="target BPE vocab size")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_tiny_model(args.directory, vocab_size=args.vocab_size, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
