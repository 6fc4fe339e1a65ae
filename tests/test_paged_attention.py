"""Decode attention read from the paged cache in place (remp/kernels/paged_attention.cpp).

Against a dense float64 reference written out here, and against the gather path it replaces
(PagedAttention.gather_decode): random caches, ragged context lengths (one slot, a block's end,
a block's start, several blocks), block tables out of order, grouped and plain multi-head
attention, float32 and bfloat16, and steps that mix several prompts of different lengths with
decodes.
"""
from __future__ import annotations

import math

import pytest
import torch

from remp.config import ModelConfig
from remp.kernels import paged_attention as kernel
from remp.kv.cache import KVCache
from remp.layers.attention import PagedAttention
from remp.layers.batch import Batch
from remp.parallel.context import ParallelContext
from remp.testing.tiny_model import make_tiny_model
from remp.topology import Topology

BLOCK = 16
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernel.load(), kernel.unavailable


def random_tables(lengths: list[int], num_blocks: int, gen: torch.Generator) -> list[list[int]]:
    """Each sequence's blocks, drawn from a shuffled pool: out of order and interleaved."""
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // BLOCK)
        tables.append(pool[:need])
        pool = pool[need:]
    return tables


def dense_reference(q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d)) v over each token's context, written out per head."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.shape[3]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t, (table, n) in enumerate(zip(tables, lengths)):
        slots = torch.tensor([table[j // BLOCK] * BLOCK + j % BLOCK for j in range(n)])
        flat = cache.double().view(-1, 2 * BLOCK, kv_heads, dim)
        keys = flat[slots // BLOCK, slots % BLOCK]
        values = flat[slots // BLOCK, BLOCK + slots % BLOCK]
        for h in range(heads):
            kh = h // (heads // kv_heads)
            p = torch.softmax(keys[:, kh] @ q[t, h].double() / math.sqrt(dim), dim=0)
            out[t, h] = p @ values[:, kh]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 16), (8, 2, 8), (4, 2, 32)])
def test_the_kernel_equals_a_dense_reference(dtype, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    lengths = [1, 15, 16, 17, 70, 3]
    num_blocks = 20
    cache = torch.randn(num_blocks, 2, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    tables = random_tables(lengths, num_blocks, gen)
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    width = max(map(len, tables))
    padded = torch.tensor([t + t[:1] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = kernel.paged_attention(q, cache, padded, torch.tensor(lengths, dtype=torch.int32), dim ** -0.5)
    ref = dense_reference(q, cache, tables, lengths)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_the_kernel_refuses_what_it_cannot_read():
    cache = torch.zeros(4, 2, BLOCK, 2, 8)
    q = torch.zeros(1, 4, 8)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32"):
        kernel.paged_attention(q, cache, torch.zeros(1, 1, dtype=torch.int64), lens, 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        kernel.paged_attention(torch.zeros(1, 3, 8), cache, torch.zeros(1, 1, dtype=torch.int32), lens, 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernel.paged_attention(q.double(), cache, torch.zeros(1, 1, dtype=torch.int32), lens, 1.0)


@pytest.mark.parametrize("variant", ["gqa", "mha", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_of_prompts_and_decodes_reads_the_cache_in_place(tmp_path, variant, dtype, monkeypatch):
    """One layer's attention for a step of two prompts (5 and 33 tokens) and four decodes with
    ragged contexts over out-of-order blocks: the in-place kernel gives the gather path's output,
    writes the same cache, and never gathers."""
    cfg = ModelConfig.from_pretrained(str(make_tiny_model(tmp_path / variant, variant=variant)))
    topo = Topology(1, 1)
    gen = torch.Generator().manual_seed(7)
    num_blocks = 24
    caches = []
    for _ in range(2):
        kv = KVCache(cfg, topo, 0, num_blocks, BLOCK, dtype, torch.device("cpu"))
        caches.append(kv)
    fill = torch.randn(caches[0].layers[0].shape, generator=gen).to(dtype)
    for kv in caches:
        kv.layers[0].copy_(fill)

    prompts, contexts = [5, 33], [2, 16, 17, 49]  # contexts: tokens before this step's one
    lengths = prompts + [c + 1 for c in contexts]
    tables = random_tables(lengths, num_blocks, gen)
    starts = [0, 0] + contexts
    q_lens = prompts + [1] * len(contexts)
    positions, slots = [], []
    for table, start, n in zip(tables, starts, q_lens):
        for p in range(start, start + n):
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
    order = [2, 0, 4, 3, 1, 5]  # prompts between decodes
    batch_args = dict(q_lens=[q_lens[i] for i in order], starts=[starts[i] for i in order],
                      block_tables=[tables[i] for i in order])
    offsets = [sum(q_lens[:i]) for i in range(len(q_lens))]
    token_order = [offsets[i] + j for i in order for j in range(q_lens[i])]
    batch = Batch(input_ids=torch.zeros(len(token_order), dtype=torch.long),
                  positions=torch.tensor([positions[i] for i in token_order]),
                  slots=torch.tensor([slots[i] for i in token_order]), block_size=BLOCK,
                  device=torch.device("cpu"), **batch_args)
    T = len(token_order)
    heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(T, heads, dim, generator=gen).to(dtype)
    k = torch.randn(T, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(T, kv_heads, dim, generator=gen).to(dtype)

    attention = PagedAttention(0, heads, kv_heads, dim, ParallelContext(topo, 0))
    assert attention.in_place
    in_place_kv, gather_kv = caches

    def no_gather(*args, **kwargs):
        raise AssertionError("the in-place path gathered the cache")

    monkeypatch.setattr(in_place_kv, "gather", no_gather)
    out = attention(q, k, v, batch, in_place_kv)
    attention.in_place = False
    ref = attention(q, k, v, batch, gather_kv)
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(in_place_kv.layers[0], gather_kv.layers[0])
    # and the decodes against the dense reference (their context includes this step's token)
    decode_rows = [token_order.index(offsets[i]) for i in order if starts[i] > 0]
    decode_seqs = [i for i in order if starts[i] > 0]
    dense = dense_reference(q[decode_rows], in_place_kv.layers[0], [tables[i] for i in decode_seqs],
                            [lengths[i] for i in decode_seqs])
    got = out.view(T, heads, dim)[decode_rows]
    torch.testing.assert_close(got.double(), dense, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_adjacent_prompts_of_one_length_are_one_attention_call(monkeypatch):
    """Prompts of 7, 7, 7, 5 and 7 tokens, then a decode: runs (3 x 7), (1 x 5), (1 x 7); the
    batched call gives each prompt what attending to itself alone gives, to the bit."""
    import torch.nn.functional as F

    lengths = [7, 7, 7, 5, 7]
    tables = [[i] for i in range(len(lengths))] + [[9, 8]]
    q_lens, starts = lengths + [1], [0] * len(lengths) + [20]
    slots = [tables[i][0] * BLOCK + p for i, n in enumerate(lengths) for p in range(n)] + [8 * BLOCK + 4]
    positions = [p for n in lengths for p in range(n)] + [20]
    batch = Batch(input_ids=torch.zeros(len(slots), dtype=torch.long), positions=torch.tensor(positions),
                  slots=torch.tensor(slots), block_size=BLOCK, q_lens=q_lens, starts=starts, block_tables=tables,
                  device=torch.device("cpu"))
    assert [(r.start, r.count, r.length) for r in batch.prefill_runs] == [(0, 3, 7), (21, 1, 5), (26, 1, 7)]

    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, T = 4, 2, 16, len(slots)
    q, k, v = (torch.randn(T, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    attention = PagedAttention(0, heads, kv_heads, dim, ParallelContext(Topology(1, 1), 0))
    out = torch.zeros(T, heads, dim)
    attention.prefill(q, k, v, batch, out)
    assert len(calls) == 3
    offset = 0
    for n in lengths:
        s, e = offset, offset + n
        alone = sdpa(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
                     is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        assert torch.equal(out[s:e], alone)
        offset = e
