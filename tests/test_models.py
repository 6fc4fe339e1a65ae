"""Model families and their weight loaders, in one process (no workers).

The loader test checks every parameter of every supported family, for every rank of every
layout of a pool of 4, against the slice rule written out here directly from `Topology`
(q/k/v and gate/up rows, o/down columns, vocabulary rows padded to ceil(V / tp), layers of
the rank's stage): the same bytes, a view of the mapped checkpoint wherever the dtype agrees.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from remp.config import ModelConfig, ModelError
from remp.kv.cache import KVCache
from remp.layers.batch import Batch
from remp.models.registry import ARCHITECTURES, model_class
from remp.parallel.context import ParallelContext
from remp.testing.tiny_model import VARIANTS, make_tiny_model
from remp.topology import Topology, valid_layouts
from remp.weights.loader import load_weights
from remp.weights.store import WeightStore

POOL = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    return {v: str(make_tiny_model(root / v, variant=v)) for v in VARIANTS}


def expected_slices(store: WeightStore, cfg: ModelConfig, topo: Topology, rank: int) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the part of it rank `rank` holds under `topo`."""
    stage, t, d = topo.coords(rank)
    hd = cfg.head_dim
    heads, kv = topo.heads_of(t, cfg.num_heads), topo.kv_heads_of(t, cfg.num_kv_heads)
    q_rows, kv_rows = range(heads.start * hd, heads.stop * hd), range(kv.start * hd, kv.stop * hd)
    mlp = topo.mlp_slice(t, cfg.intermediate_size)
    vocab = topo.vocab_slice(t, cfg.vocab_size)

    def rows(name: str, span: range) -> torch.Tensor:
        full = store.full(name)
        part = full[span.start:min(span.stop, full.shape[0])]
        missing = span.stop - max(span.start, full.shape[0])
        return torch.cat([part, part.new_zeros((missing, *part.shape[1:]))]) if missing > 0 else part

    out = {}
    if stage == 0:
        out["model.embed_tokens.weight"] = rows("model.embed_tokens.weight", vocab)
    if stage == topo.pp - 1:
        out["model.norm.weight"] = store.full("model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings or "lm_head.weight" not in store \
            else "lm_head.weight"
        out[head] = rows(head, vocab)
    for layer in topo.layers_of(stage, cfg.num_layers):
        p = f"model.layers.{layer}."
        kinds = ("weight", "bias") if cfg.attention_bias else ("weight",)
        for proj, span in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            for kind in kinds:
                out[f"{p}self_attn.{proj}_proj.{kind}"] = rows(f"{p}self_attn.{proj}_proj.{kind}", span)
        out[p + "self_attn.o_proj.weight"] = store.full(p + "self_attn.o_proj.weight")[:, q_rows.start:q_rows.stop]
        if cfg.moe is not None and layer in cfg.moe.sparse_layers:
            # the router whole; every expert cut like a dense MLP to this rank's slice of its width,
            # or, under expert parallelism over the stage's dp * tp ranks, this rank's contiguous block
            # of experts (linear) or every (dp * tp)-th from its place (round robin), whole
            moe, names = ("block_sparse_moe", ("w1", "w3", "w2")) if cfg.architecture == "MixtralForCausalLM" \
                else ("mlp", ("gate_proj", "up_proj", "down_proj"))
            n, i = cfg.moe.num_experts, cfg.moe.intermediate_size
            width = range(i) if topo.ep else range(t * i // topo.tp, (t + 1) * i // topo.tp)
            place, spread = d * topo.tp + t, topo.dp * topo.tp
            experts = (range(n) if not topo.ep else range(place, n, spread) if topo.placement == "round_robin"
                       else range(place * n // spread, (place + 1) * n // spread))
            out[f"{p}{moe}.gate.weight"] = store.full(f"{p}{moe}.gate.weight")
            for e in experts:
                gate, up, down = (f"{p}{moe}.experts.{e}.{n}.weight" for n in names)
                out[gate], out[up] = rows(gate, width), rows(up, width)
                out[down] = store.full(down)[:, width.start:width.stop]
            if cfg.moe.shared_expert_size:  # Qwen2-MoE: cut over the group's tensor ranks in every mode
                s = cfg.moe.shared_expert_size
                cut = range(t * s // topo.tp, (t + 1) * s // topo.tp)
                for n in ("gate_proj", "up_proj", "down_proj"):
                    name = f"{p}{moe}.shared_expert.{n}.weight"
                    out[name] = store.full(name)[:, cut.start:cut.stop] if n == "down_proj" else rows(name, cut)
                out[f"{p}{moe}.shared_expert_gate.weight"] = store.full(f"{p}{moe}.shared_expert_gate.weight")
            mlp_names = ()
        else:
            mlp_names = ("gate_proj", "up_proj", "down_proj")
        for proj in mlp_names:
            name = f"{p}mlp.{proj}.weight"
            out[name] = store.full(name)[:, mlp.start:mlp.stop] if proj == "down_proj" else rows(name, mlp)
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            if p + norm + ".weight" in store:
                out[p + norm + ".weight"] = store.full(p + norm + ".weight")
    return out


def build(path: str, topo: Topology, rank: int, dtype=torch.float32, reuse=None):
    cfg = ModelConfig.from_pretrained(path)
    model = model_class(cfg.architecture)(cfg, ParallelContext(topo, rank), cfg.hf_config())
    store = WeightStore(path)
    load_weights(model, store, dtype, torch.device("cpu"), reuse)
    return cfg, store, model


def checkpoint_name(store: WeightStore, param) -> str:
    return next(n for n in param.source.names if n in store)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_its_slice_for_every_layout(checkpoints, variant):
    path = checkpoints[variant]
    cfg = ModelConfig.from_pretrained(path)
    layouts = valid_layouts(cfg, POOL)
    layouts += [dataclasses.replace(t, placement="round_robin") for t in layouts if t.ep]
    assert len(layouts) >= 4, layouts
    for topo in layouts:
        for rank in range(topo.world_size):
            cfg, store, model = build(path, topo, rank)
            expected = expected_slices(store, cfg, topo, rank)
            got = {checkpoint_name(store, p): p for _, p in model.named_parameters()}
            assert got.keys() == expected.keys(), (topo, rank)
            padded = topo.vocab_slice(topo.coords(rank)[1], cfg.vocab_size).stop > cfg.vocab_size
            for name, param in got.items():
                assert param.dtype == torch.float32 and torch.equal(param, expected[name]), (topo, rank, name)
                vocab_rows = name in ("model.embed_tokens.weight", "lm_head.weight")
                assert store.maps(param) or (padded and vocab_rows), f"{name} copied under {topo} rank {rank}"


def test_another_dtype_converts_and_reuse_takes_the_same_tensors(checkpoints):
    path = checkpoints["qwen3"]
    cfg, store, model = build(path, Topology(2, 1), 1, dtype=torch.bfloat16)
    expected = expected_slices(store, cfg, Topology(2, 1), 1)
    for _, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and not store.maps(param)
        assert torch.equal(param, expected[checkpoint_name(store, param)].to(torch.bfloat16))
    # The same tensor split under another pipeline depth (rank 1 is stage 0's second tensor rank
    # there: the embedding and layers 0-1): every tensor it holds is taken from the old model.
    old = dict(model.named_parameters())
    _, _, again = build(path, Topology(2, 2), 1, dtype=torch.bfloat16, reuse=old)
    names = [n for n, _ in again.named_parameters()]
    assert "embed_tokens.weight" in names and not any(n.startswith("layers.2.") for n in names)
    assert all(old[n] is p for n, p in again.named_parameters())


def test_a_checkpoint_missing_a_tensor_is_refused_by_name(checkpoints, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    path = tmp_path / "broken"
    shutil.copytree(checkpoints["qwen3"], path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.self_attn.k_norm.weight"):
        build(str(path), Topology(1, 1), 0)
    # A sliding-window Qwen3 is refused when its config is read, with the reason.
    config = json.loads((path / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    config.pop("layer_types", None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="sliding-window"):
        ModelConfig.from_pretrained(str(path))


def test_every_registered_architecture_has_a_tiny_checkpoint(checkpoints):
    """A family added to the registry comes with a tiny variant (so the tests above cover it)."""
    covered = {AutoConfig.from_pretrained(p).architectures[0] for p in checkpoints.values()}
    assert covered == set(ARCHITECTURES)


def batch_of(token_ids: list[int], start: int, block_table: list[int], block_size: int) -> Batch:
    positions = list(range(start, start + len(token_ids)))
    slots = [block_table[p // block_size] * block_size + p % block_size for p in positions]
    return Batch(input_ids=torch.tensor(token_ids), positions=torch.tensor(positions), slots=torch.tensor(slots),
                 block_size=block_size, q_lens=[len(token_ids)], starts=[start], block_tables=[block_table],
                 device=torch.device("cpu"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_single_rank_model_matches_transformers(checkpoints, variant):
    """Prefill then greedy decodes over the paged cache: logits equal transformers' forward."""
    path = checkpoints[variant]
    cfg, _, model = build(path, Topology(1, 1), 0)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kv = KVCache(cfg, Topology(1, 1), 0, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    tokens = [5, 17, 99, 3, 42, 7]
    table = [3, 0, 6, 1, 5]
    blocks = table[:2]  # as the scheduler hands them out: only blocks that hold tokens
    logits = model(batch_of(tokens, 0, blocks, 4), None, kv)
    for _ in range(6):
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1]
        torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=1e-4)
        tokens.append(int(logits[0].argmax()))
        blocks = table[:-(-len(tokens) // 4)]
        logits = model(batch_of(tokens[-1:], len(tokens) - 1, blocks, 4), None, kv)


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_packed_for_onednn_compute_the_same_bits(checkpoints, variant):
    """bfloat16, tp1pp1: a prefill and decodes with every linear and the LM head packed (q/k/v and
    gate/up fused) give the logits of the same model on views, to the bit; a second model of the
    same split adopts the packed weights instead of packing again."""
    from remp.config import cpu_has_native_bf16
    from remp.layers.packed import adopt_packed, pack_linears, packing_works

    if not (packing_works() and cpu_has_native_bf16()):
        pytest.skip("packing is the default only on CPUs with native bfloat16 (where F.linear is oneDNN's too)")
    path = checkpoints[variant]
    cfg, _, views = build(path, Topology(1, 1), 0, torch.bfloat16)
    _, _, packed = build(path, Topology(1, 1), 0, torch.bfloat16)
    assert pack_linears(packed) > 0
    layers = [m for m in packed.modules() if hasattr(m, "pack")]
    dense = cfg.num_layers - (len(cfg.moe.sparse_layers) if cfg.moe else 0)  # experts are not packed
    assert len(layers) == 2 * cfg.num_layers + 2 * dense + 1 and all(m.packed is not None for m in layers)
    outs = []
    for model in (views, packed):
        kv = KVCache(cfg, Topology(1, 1), 0, num_blocks=8, block_size=4, dtype=torch.bfloat16,
                     device=torch.device("cpu"))
        tokens, table = [5, 17, 99, 3, 42, 7], [3, 0, 6, 1, 5]
        logits = [model(batch_of(tokens, 0, table[:2], 4), None, kv)]
        for step in range(5):
            tokens.append(int(logits[-1][0].argmax()))
            logits.append(model(batch_of(tokens[-1:], len(tokens) - 1, table[:-(-len(tokens) // 4)], 4), None, kv))
        outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])
    # as a worker builds the next model of the same split: the same weight tensors, so no packing
    _, _, again = build(path, Topology(1, 1), 0, torch.bfloat16, reuse=dict(packed.named_parameters()))
    assert adopt_packed(again, packed) == []
    assert all(a.packed is p.packed for a, p in zip(again.modules(), packed.modules()) if hasattr(a, "pack"))
