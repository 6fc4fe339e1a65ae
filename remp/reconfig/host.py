"""What a live layout switch needs of the engine it switches (remp.reconfig.transaction).

The switch never touches the scheduler, its requests or its block pool: it asks the engine
through the named methods below, and drives the workers through the engine's executor. The
engine (remp.engine.llm_engine.LLMEngine) satisfies `SwitchHost` structurally; this module and
the transaction import nothing from it, so the dependency runs one way: engine -> switch.

Block ids are global KV block ids (remp.kv.placement.BlockSpace: each data-parallel group's own
ids, offset by the group): a "live" block is one held by a running request; a "full" one holds
block_size computed tokens and is not written again while its request holds it; a "filling" one
is the last of a request, or one a step in flight has taken.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from remp.config import EngineConfig, ModelConfig
    from remp.engine.outputs import RequestOutput
    from remp.executor.local import LocalExecutor
    from remp.kv.placement import Placement, RequestKV
    from remp.topology import Topology

    OnOutputs = Callable[[list[RequestOutput]], None]


class Recovered(Protocol):
    """What the switch reads of a recovery from lost workers."""

    @property
    def replaced_ranks(self) -> list[int]: ...

    @property
    def preempted_request_ids(self) -> list[str]: ...

    @property
    def cause(self) -> str: ...


class SwitchHost(Protocol):
    """The engine as a layout switch uses it (read-only attributes, then methods)."""

    config: EngineConfig
    model_config: ModelConfig
    dtype: torch.dtype
    executor: LocalExecutor  # the switch's collaborator: it prepares, pre-copies and commits on the workers

    @property
    def topology(self) -> Topology: ...

    @property
    def num_kv_blocks(self) -> int:
        """The size of the current KV block pool of each data-parallel group."""

    def num_blocks_for(self, topo: Topology) -> int: ...

    def threads_for(self, topo: Topology) -> int: ...

    # requests and their KV blocks
    def pause_admission(self) -> None:
        """Admit no new prompt until `resume_admission`; running requests keep stepping."""

    def resume_admission(self) -> None: ...

    def num_running(self) -> int: ...

    def running_kv(self) -> list[RequestKV]:
        """Every running request's blocks (global ids), how many are full, their hand-out counts."""

    def preempt_requests(self, keys: list[int]) -> list[str]:
        """Preempt the running requests with these keys (they recompute later); their request ids."""

    def adopt_placement(self, num_blocks: int, dp: int, placement: Placement) -> None:
        """Take `dp` pools of `num_blocks`, each running request in its placed group, each block at
        its placed id."""

    # steps and workers
    def step(self, interrupt: Callable[[], bool] | None = None) -> list[RequestOutput]: ...

    def drain(self, on_outputs: OnOutputs) -> None:
        """Collect every step in flight, cut or not."""

    def recover(self, on_outputs: OnOutputs) -> Recovered: ...
