"""Linear weights packed for oneDNN, for bfloat16 on CPUs with native bfloat16 (AMX, AVX512-BF16).

torch's bfloat16 matmul on such a CPU goes through oneDNN, which reorders the weight into its
blocked layout on every call; packing it once (`torch.ops.mkldnn._reorder_linear_weight`, what
torch.compile's CPU freezing and vLLM's CPU backend do) halves a decode step's matmul time on SmolLM2
(batch 1-32: 55-75 us -> 28-37 us for a 1536 x 576 projection) and gives bit-identical results
there (torch's own bfloat16 matmul is oneDNN's on such a CPU; where `--pack-weights` is asked for on
another CPU, the low bits may differ from unpacked serving).
The price is a copy: a packed weight is this rank's own memory, not a view of the shared weight
store. A worker packs a layout's layers once its switch is final, on its builder thread beside the
steps (remp.worker.worker.Worker._pack_in_background), so a switch waits for none. Since it is a copy
anyway, q/k/v and gate/up are fused into one packed matrix each (one call instead of three or two).
`--pack-weights` decides (see remp.config.resolve_pack_weights); float32 is never packed: oneDNN's
float32 path is not faster there, and its results would differ from transformers' in the last bits.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def packing_works() -> bool:
    """Whether this torch and CPU pack and run a bfloat16 linear through oneDNN (tried once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 32, dtype=torch.bfloat16))
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 32, dtype=torch.bfloat16), w, None, "none", [], "")
        return bool((y == 32).all())
    except RuntimeError:
        return False


class PackedLinear:
    """y = x [W_0; W_1; ...]^T (+ [b_0; b_1; ...]), the weights stacked by rows and packed once.
    `split` gives each part's output width, for callers that take the parts apart again."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.split = [w.shape[0] for w in weights]
        self.sources = [w.data_ptr() for w in weights]  # what it was packed from (reuse check)
        self.nbytes = weight.numel() * weight.element_size()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.bias = None if biases[0] is None else torch.cat(biases).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def packs(self, weights: list[torch.Tensor]) -> bool:
        """Whether this was packed from exactly these tensors (a layer that stays on this rank)."""
        return self.sources == [w.data_ptr() for w in weights] and self.split == [w.shape[0] for w in weights]


def adopt_packed(model: torch.nn.Module, reuse: torch.nn.Module | None) -> list[torch.nn.Module]:
    """Give each packable layer of `model` (one with `adopt` and `pack`: remp.layers.linear's
    linears, the LM head) the packed weights of the layer of the same name in `reuse` (the model
    in use) where they were packed from the same tensors: no copy. Returns the layers still to pack."""
    old = dict(reuse.named_modules()) if reuse is not None else {}
    return [module for name, module in model.named_modules()
            if hasattr(module, "pack") and not module.adopt(getattr(old.get(name), "packed", None))]


def drop_packed(model: torch.nn.Module) -> None:
    """Let go of `model`'s packed weights (a layout left behind: kept models hold views only)."""
    for module in model.modules():
        if hasattr(module, "pack"):
            module.packed = None


def pack_linears(model: torch.nn.Module, reuse: torch.nn.Module | None = None) -> int:
    """Pack every packable layer of `model` now (adopting what `reuse` has); returns the bytes packed."""
    return sum(layer.pack() for layer in adopt_packed(model, reuse))
