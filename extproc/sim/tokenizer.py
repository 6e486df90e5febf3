"""The simulator's tokenizer lives in the product (:mod:`extproc.datalayer.simtokenizer`); this name is kept
for the lab's imports."""

from extproc.datalayer.simtokenizer import OUTPUT_WORDS, VOCAB_SIZE, SimTokenizer, get_tokenizer

__all__ = ["VOCAB_SIZE", "OUTPUT_WORDS", "SimTokenizer", "get_tokenizer"]
