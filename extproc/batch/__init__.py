"""The OpenAI-compatible Batch API beside the gateway (``extproc batch serve``).

A separate service: it stores files and batches, validates input line by line, and dispatches every line
through the gateway (Envoy + the scheduler) with the batch objective. The product (server, scheduling,
admission, ...) never imports this package; this package uses only the product's public pieces.
See docs/batch.md.
"""
