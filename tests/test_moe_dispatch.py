"""Expert parallelism across data-parallel groups: the all-to-all dispatch and combine of a
mixture-of-experts layer (remp.layers.moe.SparseMoE.dispatch_combine) gives what the whole layer
computes on one rank, on random inputs that differ between groups, with linear and round-robin
placement, with a group that has no tokens, and with a router that sends every token to the same
experts; and a cut asked of one rank stops every rank of the stage in the same exchange."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from torch import nn

from remp.config import MoEConfig
from remp.topology import Topology

WORLD = 4
HIDDEN, INTER, EXPERTS, TOP_K = 16, 24, 8, 2
LAYOUTS = [Topology(1, 1, ep=True, dp=4), Topology(2, 1, ep=True, dp=2, placement="round_robin"),
           Topology(2, 1, ep=True, dp=2)]
TOKENS = [5, 0, 3, 7]  # per data-parallel group (an idle group among them)


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"router": torch.randn(EXPERTS, HIDDEN, generator=g),
            "gate": torch.randn(EXPERTS, INTER, HIDDEN, generator=g) / 4,
            "up": torch.randn(EXPERTS, INTER, HIDDEN, generator=g) / 4,
            "down": torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / 4}


def inputs(group: int, one_expert: bool) -> torch.Tensor:
    x = torch.randn(TOKENS[group], HIDDEN, generator=torch.Generator().manual_seed(100 + group))
    return x.abs() if one_expert else x


def one_expert_router() -> torch.Tensor:
    """Every token (positive entries) scores expert 3 highest and the rest the same: top-2 is
    experts 3 and 0 for all of them, so every row goes to the same one or two ranks."""
    router = -torch.ones(EXPERTS, HIDDEN)
    router[3] = 1.0
    return router


def dense(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer on one rank holding every expert: softmax, top-k, renormalised, summed."""
    probs = torch.softmax(x @ w["router"].T, dim=-1, dtype=torch.float32)
    top, chosen = torch.topk(probs, TOP_K, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            e = int(chosen[t, k])
            h = torch.nn.functional.silu(x[t] @ w["gate"][e].T) * (x[t] @ w["up"][e].T)
            out[t] += top[t, k] * (h @ w["down"][e].T)
    return out


def rank_main(rank: int, store: str, out_dir: str, cut_path: str) -> None:
    from remp.executor.cut import CutFlags
    from remp.layers.moe import SparseMoE
    from remp.parallel.context import ParallelContext, StepCut
    from remp.parallel.groups import Groups, init_world

    torch.set_num_threads(1)
    init_world(rank, WORLD, store, "gloo")
    groups = Groups(rank)
    cfg = SimpleNamespace(hidden_size=HIDDEN, moe=MoEConfig(num_experts=EXPERTS, top_k=TOP_K, intermediate_size=INTER,
                                                            renormalize=True, scores_in_float=True, sparse_layers=(0,)))
    results = {}
    for topo in LAYOUTS:
        for one_expert in (False, True):
            w = weights()
            if one_expert:
                w["router"] = one_expert_router()
            moe = SparseMoE(cfg, ParallelContext(topo, rank, groups), "model.layers.0.mlp", ("w1", "w3", "w2"))
            moe.router_weight = nn.Parameter(w["router"], requires_grad=False)
            for e, expert in moe.experts.items():
                expert.gate_weight = nn.Parameter(w["gate"][int(e)], requires_grad=False)
                expert.up_weight = nn.Parameter(w["up"][int(e)], requires_grad=False)
                expert.down_weight = nn.Parameter(w["down"][int(e)], requires_grad=False)
            group = topo.coords(rank).dp_rank
            results[f"{topo}/{one_expert}"] = (moe(inputs(group, one_expert)), sorted(map(int, moe.experts)))
    # A cut asked of rank 2 alone: every rank stops in the same exchange.
    topo = LAYOUTS[0]
    ctx = ParallelContext(topo, rank, groups, CutFlags(cut_path, WORLD))
    moe = SparseMoE(cfg, ctx, "model.layers.0.mlp", ("w1", "w3", "w2"))
    ctx.begin_step(0)
    try:
        moe.route = lambda x: (torch.zeros(x.shape[0], TOP_K, dtype=torch.long), torch.ones(x.shape[0], TOP_K))
        moe(torch.zeros(TOKENS[rank], HIDDEN))
        results["cut"] = False
    except StepCut:
        results["cut"] = True
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_dispatch_and_combine_equal_the_dense_layer(tmp_path):
    from remp.executor.cut import CutFlags

    flags = CutFlags(str(tmp_path / "cut"), WORLD, create=True)
    flags.cut(0, [2])
    mp.spawn(rank_main, args=(f"file://{tmp_path}/store", str(tmp_path), str(tmp_path / "cut")), nprocs=WORLD)
    flags.close()
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for topo in LAYOUTS:
        held = [results[r][f"{topo}/False"][1] for r in range(WORLD)]
        assert sorted(e for experts in held for e in experts) == list(range(EXPERTS)), topo  # each expert once
        for one_expert in (False, True):
            w = weights()
            if one_expert:
                w["router"] = one_expert_router()
            for rank in range(WORLD):
                group = topo.coords(rank).dp_rank
                got = results[rank][f"{topo}/{one_expert}"][0]
                torch.testing.assert_close(got, dense(inputs(group, one_expert), w), rtol=1e-5, atol=1e-5)
    assert [results[r]["cut"] for r in range(WORLD)] == [True] * WORLD
