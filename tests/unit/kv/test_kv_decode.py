"""Decoding vLLM KV-event messages: both encodings, optional fields, unknown types, malformed frames."""

from __future__ import annotations

import msgpack
import pytest

from extproc.datalayer.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    decode_message,
    encode_batch,
)


def frames(payload: bytes, seq: int = 7, topic: str = "kv@pod-a@tiny") -> list[bytes]:
    return [topic.encode(), seq.to_bytes(8, "big"), payload]


def test_map_encoding_full_fields() -> None:
    ev = {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 1,
        "kv_cache_spec_kind": "sliding_window",
        "kv_cache_spec_sliding_window": 64,
    }
    b = decode_message(frames(msgpack.packb([1.5, [ev, {"type": "AllBlocksCleared"}], 0])))
    assert (b.topic, b.seq, b.ts, b.dp_rank, b.unknown) == ("kv@pod-a@tiny", 7, 1.5, 0, 0)
    st = b.events[0]
    assert isinstance(st, BlockStored)
    assert st.block_hashes == [11, 12] and st.parent_block_hash is None and st.block_size == 16
    assert (st.group_idx, st.kv_cache_spec_kind, st.kv_cache_spec_sliding_window) == (1, "sliding_window", 64)
    assert isinstance(b.events[1], AllBlocksCleared)


def test_array_encoding_with_trailing_fields_omitted() -> None:
    stored = ["BlockStored", [5], 4, [1, 2, 3, 4], 4, 3, "cpu"]  # no lora_name / group fields
    removed = ["BlockRemoved", [5]]
    b = decode_message(frames(msgpack.packb([2.0, [stored, removed, ["AllBlocksCleared"]]])))
    st, rm, clr = b.events
    assert isinstance(st, BlockStored) and st.parent_block_hash == 4 and st.lora_id == 3
    assert st.medium == "CPU" and st.group_idx == 0 and st.kv_cache_spec_kind == "full_attention"
    assert st.lora_key == "3"
    assert isinstance(rm, BlockRemoved) and rm.block_hashes == [5] and rm.medium == "GPU" and rm.group_idx == 0
    assert isinstance(clr, AllBlocksCleared)
    assert b.dp_rank is None


def test_map_batch_and_missing_optional_fields() -> None:
    payload = msgpack.packb({"ts": 3.0, "events": [{"type": "BlockStored", "block_hashes": [1], "token_ids": [9, 9]}]})
    b = decode_message(frames(payload, seq=0))
    st = b.events[0]
    assert isinstance(st, BlockStored)
    assert st.parent_block_hash is None and st.block_size == 0 and st.medium == "GPU" and st.lora_key is None


def test_bytes_hashes_fold_to_last_eight_bytes() -> None:
    h = bytes(range(32))
    payload = msgpack.packb([0.0, [{"type": "BlockRemoved", "block_hashes": [h], "medium": None}], 0], use_bin_type=True)
    ev = decode_message(frames(payload)).events[0]
    assert isinstance(ev, BlockRemoved)
    assert ev.block_hashes == [int.from_bytes(h[-8:], "big")]


def test_unknown_event_types_are_counted_and_ignored() -> None:
    payload = msgpack.packb([0.0, [{"type": "SomethingNew", "x": 1}, ["AlsoNew", 1], {"type": "AllBlocksCleared"}], 0])
    b = decode_message(frames(payload))
    assert b.unknown == 2 and len(b.events) == 1


@pytest.mark.parametrize(
    "msg",
    [
        [b"t", b"\x00" * 8],  # two frames
        [b"t", b"\x00" * 4, msgpack.packb([0.0, [], 0])],  # short seq
        [b"t", b"\x00" * 8, b"\xc1\xc1"],  # not msgpack
        [b"t", b"\x00" * 8, msgpack.packb("hello")],  # not a batch
        [b"t", b"\x00" * 8, msgpack.packb([0.0, "events", 0])],  # events not a list
        [b"t", b"\x00" * 8, msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": "x"}], 0])],
        [b"t", b"\x00" * 8, msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"]}], 0])],
        [b"t", b"\x00" * 8, msgpack.packb([0.0, [42], 0])],
    ],
)
def test_malformed_messages_raise(msg: list[bytes]) -> None:
    with pytest.raises(DecodeError):
        decode_message(msg)


def test_encode_roundtrip_both_forms() -> None:
    evs = [
        BlockStored([1, 2], None, list(range(8)), 4, None, "GPU", "sql", 0, "full_attention", None),
        BlockRemoved([2], "CPU", 1),
        AllBlocksCleared(),
    ]
    for arr in (False, True):
        b = decode_message(frames(encode_batch(evs, 1.0, 0, array_events=arr)))
        assert b.events == evs
