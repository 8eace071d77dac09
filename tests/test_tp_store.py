"""The TP group's stores without an engine: two processes stand for TP ranks 0 and 1.

Rank 0 writes the group's hidden chunks and its K/V shard; rank 1 (another process: LMDB allows one
open environment per process) writes its shard and reads the hidden chunks through a PeerStore.
"""

import multiprocessing as mp

import pytest
import torch

from hcache_sglang.backends import LayerKind, Namespace, StoreConfig, chunk_layout
from hcache_sglang.serving.tp_layout import TPLayout, check_kv_heads, check_tp_size, group_namespaces
from hcache_sglang.serving.tp_store import GroupStore

from test_store import chain, payload

H, KV = LayerKind.HIDDEN, LayerKind.KV
NS = Namespace("model-a", num_layers=3, hidden_size=64, num_kv_heads=2, head_dim=16,
               dtype="float32", page_size=4)
KINDS = (H, KV, H)
PAGES = 20


def _store(tmp, rank):
    config = StoreConfig(str(tmp), capacity_bytes=8 << 20, staging_bytes=4 << 20)
    return GroupStore(config, TPLayout(rank, 2), NS, KINDS, total_kv_heads=4)


def _read(store, keys):
    n = len(keys) * NS.page_size
    out = [torch.empty((n, *NS.row_shape(k)), dtype=torch.float32) for k in KINDS]
    pos, tok = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int32)
    ok = store.read(NS, keys, out, pos, tok).wait()
    return ok, out, pos, tok


def _rank1(tmp, step, results):
    """Rank 1: save its shard (KV layer seed 1), then look up and read what rank 0 and it wrote."""
    try:
        _rank1_step(tmp, step, results)
    except BaseException as exc:  # the test sees the error instead of waiting for a result
        results.put(exc)
        raise


def _rank1_step(tmp, step, results):
    keys = chain(PAGES)
    store = _store(tmp, 1)
    try:
        if step == "save":
            mine = payload(NS, PAGES, KINDS, seed=1)
            mine["positions"] = payload(NS, PAGES, KINDS, seed=0)["positions"]
            mine["token_ids"] = payload(NS, PAGES, KINDS, seed=0)["token_ids"]
            results.put(store.save(NS, keys, **mine))
            store.flush()
            return
        hit = store.lookup(NS, keys).num_pages
        if not hit:
            results.put((0, None, None, None, None))
            return
        ok, out, pos, tok = _read(store, keys)
        results.put((hit, ok, [t.tolist() for t in out] if ok else None, pos.tolist(), tok.tolist()))
    finally:
        store.close()


def _in_rank1(tmp, step):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_rank1, args=(tmp, step, results))
    proc.start()
    value = results.get(timeout=120)
    proc.join(timeout=60)
    if isinstance(value, BaseException):
        raise value
    return value


def test_one_hidden_copy_per_group_and_per_rank_shards(tmp_path):
    keys = chain(PAGES)
    data = payload(NS, PAGES, KINDS, seed=0)
    # rank 1 first: it cannot see rank 0's hidden store before rank 0 created it -> no hit, no crash
    assert _in_rank1(tmp_path, "save") is True
    assert _in_rank1(tmp_path, "read")[0] == 0
    rank0 = _store(tmp_path, 0)
    try:
        assert rank0.save(NS, keys, **data)
        rank0.flush()
        # rank 0: hidden layers 0 and 2 in tp-hidden, its K/V (layer 1) in tp2-rank0
        assert rank0.lookup(NS, keys).num_pages == PAGES
        ok, out, pos, _ = _read(rank0, keys)
        assert ok and all(torch.equal(a, b) for a, b in zip(out, data["layers"]))
        # rank 1 (another process): the same hidden layers, its own K/V shard (seed 1), never rank 0's
        hit, ok, out1, pos1, tok1 = _in_rank1(tmp_path, "read")
        assert hit == PAGES and ok
        mine = payload(NS, PAGES, KINDS, seed=1)["layers"][1]
        assert torch.equal(torch.tensor(out1[0]), data["layers"][0])
        assert torch.equal(torch.tensor(out1[2]), data["layers"][2])
        assert torch.equal(torch.tensor(out1[1]), mine)
        assert pos1 == data["positions"].tolist() and tok1 == data["token_ids"].tolist()
        # one copy of the hidden states: the hidden store holds exactly the chunks of layers 0 and 2
        one_copy = sum(chunk_layout(rank0.hidden_ns, tokens, (H, H)).total_bytes
                       for tokens in (64, 16))  # 20 pages of 4 tokens: a 64-token chunk and a 16-token one
        assert rank0.hidden.stats().bytes_written == one_copy
        # a device hit reaches both stores rank 0 writes (rank 1 touches only its shard)
        rank0.touch(NS, keys)
        rank0.flush()
        assert rank0.hidden.stats().touched_pages == rank0.shard.stats().touched_pages == PAGES
    finally:
        rank0.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp-hidden", "tp2-rank0", "tp2-rank1"]


def test_a_shard_whose_tokens_differ_from_the_hidden_chunks_fails_the_read(tmp_path):
    keys = chain(PAGES)
    rank0 = _store(tmp_path, 0)
    try:
        data = payload(NS, PAGES, KINDS, seed=0)
        shifted = dict(data, positions=data["positions"] + 1)  # same keys, other positions
        assert rank0.hidden.save(rank0.hidden_ns, keys, positions=data["positions"], token_ids=data["token_ids"],
                                 layers=[data["layers"][0], data["layers"][2]], layer_kinds=[H, H])
        assert rank0.shard.save(rank0.kv_ns, keys, positions=shifted["positions"], token_ids=data["token_ids"],
                                layers=[data["layers"][1]], layer_kinds=[KV])
        rank0.flush()
        assert rank0.lookup(NS, keys).num_pages == PAGES
        assert _read(rank0, keys)[0] is False
    finally:
        rank0.close()


def test_namespaces_record_the_tp_layout():
    hidden2, kv2 = group_namespaces(NS, KINDS, TPLayout(1, 2), total_kv_heads=4)
    hidden4, kv4 = group_namespaces(NS, KINDS, TPLayout(1, 4), total_kv_heads=4)
    _, kv2_rank0 = group_namespaces(NS, KINDS, TPLayout(0, 2), total_kv_heads=4)
    # hidden chunks: one namespace for every TP size and rank; K/V shards: one per (rank, size)
    assert hidden2.key_prefix == hidden4.key_prefix
    assert len({kv2.key_prefix, kv4.key_prefix, kv2_rank0.key_prefix, NS.key_prefix}) == 4
    assert (hidden2.num_layers, kv2.num_layers) == (2, 1)
    # a plan storing other layers as hidden states gets other namespaces
    other, _ = group_namespaces(NS, (H, H, KV), TPLayout(1, 2), total_kv_heads=4)
    assert other.key_prefix != hidden2.key_prefix


@pytest.mark.parametrize("heads,kv_heads,tp,ok", [(4, 4, 2, True), (4, 2, 2, True), (4, 2, 4, True),
                                                  (4, 4, 3, False), (8, 4, 8, True), (12, 4, 6, False)])
def test_tp_sizes_the_heads_cannot_be_split_by_are_refused_by_name(heads, kv_heads, tp, ok):
    if ok:
        check_kv_heads(kv_heads, heads, tp)
    else:
        with pytest.raises(ValueError, match=f"--tp {tp} cannot split"):
            check_kv_heads(kv_heads, heads, tp)


def test_a_model_config_the_tp_size_cannot_split_is_refused_before_sglang_asserts():
    """What a server at --tp 3 on a 4-head model hears (the model-load hook runs this check)."""
    from types import SimpleNamespace

    hf_config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=256, num_hidden_layers=2)
    check_tp_size(hf_config, 2)
    with pytest.raises(ValueError, match=r"--tp 3 cannot split the model's 4 attention heads and 2 KV heads: "
                                         r"expected one of \[1, 2, 4\]"):
        check_tp_size(hf_config, 3)
