"""extproc: an Envoy ext_proc scheduler for LLM inference."""

__version__ = "0.1.0"
