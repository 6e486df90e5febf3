"""The decode-side P/D sidecar (``extproc pd-sidecar``): runs the prefill leg on the pod named by
``x-prefiller-host-port``, then the decode leg on the local vLLM with the returned ``kv_transfer_params``."""
