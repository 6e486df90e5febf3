"""The cost of moving a prompt's KV cache from a prefill pod to a decode pod (P/D disaggregation).

vLLM's NixlConnector: the prefill pod computes the prompt with ``max_tokens=1`` and returns
``kv_transfer_params`` naming its engine and the KV blocks; the decode pod READs those blocks over the network
before it schedules the request (``WAITING_FOR_REMOTE_KVS``), so the transfer lands on TTFT.

    KV bytes per token = 2 (K and V) × layers × KV heads × head dim × dtype bytes
    transfer seconds   = setup latency + KV bytes × transferred tokens / (link bandwidth × efficiency)

Link profiles are nominal line rates with an assumed achievable efficiency (docs/pd.md has the arithmetic):
``rdma-400g`` (400 Gb/s RoCE/InfiniBand NIC, NIXL over UCX), ``tcp-25g`` (25 Gb/s Ethernet, NIXL over TCP).
A transfer fails with probability ``failure_rate``; the decode pod's ``kv_load_failure_policy`` (vLLM's
``KVTransferConfig`` field) decides what happens then: ``fail`` ends the request with an error, ``recompute``
prefills the prompt locally.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinkProfile", "LINKS", "get_link", "kv_bytes_per_token", "transfer_seconds", "FAILURE_POLICIES"]

FAILURE_POLICIES = ("fail", "recompute")


@dataclass(frozen=True, slots=True)
class LinkProfile:
    name: str
    gbps: float  # nominal line rate, gigabits per second
    setup_ms: float  # per-transfer fixed cost: descriptor exchange, RDMA READ post, completion notification
    efficiency: float = 0.8  # fraction of the line rate a large transfer achieves
    sources: str = ""

    def __post_init__(self) -> None:
        if self.gbps <= 0 or self.setup_ms < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"link {self.name}: gbps > 0, setup_ms >= 0, 0 < efficiency <= 1")

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8.0 * self.efficiency


LINKS: dict[str, LinkProfile] = {
    "rdma-400g": LinkProfile(
        "rdma-400g", 400.0, 0.5, 0.8,
        "ConnectX-7 class 400 Gb/s NIC; NIXL/UCX RDMA READ reaches ~80% of line rate on large messages; "
        "0.5 ms for the metadata exchange and completion notification per request",
    ),
    "tcp-25g": LinkProfile(
        "tcp-25g", 25.0, 2.0, 0.8,
        "25 Gb/s Ethernet with NIXL over TCP (no RDMA): ~80% of line rate, 2 ms per-transfer setup "
        "(connection reuse, kernel copies)",
    ),
}


def get_link(name: str) -> LinkProfile:
    try:
        return LINKS[name]
    except KeyError:
        raise KeyError(f"unknown link profile {name!r}; known: {', '.join(sorted(LINKS))}") from None


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """2 (K and V) × layers × KV heads × head dim × dtype bytes (Llama-3.1-8B bf16: 131,072 B)."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def transfer_seconds(tokens: int, bytes_per_token: int, link: LinkProfile) -> float:
    """Seconds to move ``tokens`` tokens of KV over ``link`` (setup included; 0 tokens → 0)."""
    if tokens <= 0:
        return 0.0
    return link.setup_ms / 1000.0 + tokens * bytes_per_token / link.bytes_per_s
