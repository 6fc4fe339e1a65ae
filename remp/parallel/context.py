"""A rank's place in one layout, and every exchange its model makes there.

`ParallelContext` plays the part of vLLM's `GroupCoordinator`: model code never names a process
group, it asks its context — `all_reduce` after a row-parallel linear or the vocabulary-parallel
embedding, `gather_to_first` for the logits, `recv_hidden` / `send_hidden` between pipeline
stages. Two layouts live in a worker during a switch (the one serving and the one being
prepared), so a context belongs to a (topology, rank), not to the process.

The context also carries the live switch's cut check (see remp.executor.cut): the steps in
flight when a switch's pause begins stop at their next check. A rank whose stage has tensor
peers decides in its all-reduces, with one more element that every rank adds its own answer
to, so all ranks of the stage stop at the same layer or none does (one leaving alone would
strand the others in their next collective). A rank with no tensor peers may stop alone, and
checks more often (`stop_if_cut`): within attention and the MLP too, and between chunks of the
LM head. Where expert parallelism exchanges tokens between data-parallel groups (all-to-all,
`exchange_counts`), every rank of the stage decides there instead, in the exchange of counts
that precedes each layer's tokens: the groups run different requests and their all-reduces do
not meet, but every one of them joins every exchange, so all stop at the same layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from remp.executor.cut import CutFlags
from remp.parallel.groups import Groups
from remp.topology import Topology


class StepCut(Exception):
    """A step was cut short at a check: it computed nothing the engine counts, and runs again."""


def with_cut_flag(x: torch.Tensor, cut: bool) -> torch.Tensor:
    """`x` flattened, with one more element that says whether the step is cut: how a cut
    travels with a tensor that moves anyway (summed by a TP all-reduce, carried by a pipeline
    send). The receiver reads the flag at [-1] and the tensor from [:-1]."""
    return torch.cat([x.reshape(-1), x.new_full((1,), float(cut))])


class ParallelContext:
    """Coordinates, groups and cut check of rank `rank` under `topo`.

    `groups` is None for a model built outside a worker pool: it loads its weights, and runs
    only where it needs no exchange (tp1pp1); an exchange without a group raises.
    `cut_flags` None, or a device other than the CPU, turns the cut checks off: on a GPU a step
    takes milliseconds, and reading a flag on the host at every check would stall the kernel queue.
    """

    def __init__(self, topo: Topology, rank: int, groups: Groups | None = None, cut_flags: CutFlags | None = None,
                 device: torch.device = torch.device("cpu")):
        coords = topo.coords(rank)
        if coords is None:
            raise ValueError(f"rank {rank} is standby under {topo}: it has no model")
        self.topo = topo
        self.rank = rank
        self.stage, self.tp_rank, self.dp_rank = coords
        self.tp_size = topo.tp
        self.is_first = self.stage == 0
        self.is_last = self.stage == topo.pp - 1
        self.device = device
        self.tp_group = groups.tp_group(topo) if groups is not None else None
        self.stage_group = groups.stage_group(topo) if groups is not None and topo.exchanges_tokens else None
        # Set by a mixture-of-experts layer built on this context when it exchanges tokens between
        # data-parallel groups: the cut is then decided in those exchanges only (module docstring).
        self.votes_in_exchange = False
        self._carried_cut = False  # a cut the previous stage passed on, held for the next exchange
        self._pipeline = groups.pipeline if groups is not None else None
        self._cut_flags = cut_flags if device.type == "cpu" else None
        self._step_id = -1

    def release(self) -> None:
        """Let go of the groups (the world they belong to is being left): their connections close
        once no reference is left. The context cannot exchange anything after this."""
        self.tp_group = None
        self.stage_group = None
        self._pipeline = None

    def _tp(self) -> dist.ProcessGroup:
        if self.tp_group is None:
            raise RuntimeError(f"rank {self.rank} has no tensor-parallel group under {self.topo} "
                               f"(built outside a worker pool, or its world was left)")
        return self.tp_group

    def _pp(self) -> dist.ProcessGroup:
        if self._pipeline is None:
            raise RuntimeError(f"rank {self.rank} has no pipeline group under {self.topo} "
                               f"(built outside a worker pool, or its world was left)")
        return self._pipeline

    # the cut check
    def begin_step(self, step_id: int) -> None:
        """The checks from now on ask whether step `step_id` is cut."""
        self._step_id = step_id
        self._carried_cut = False

    @property
    def checks_cuts(self) -> bool:
        return self._cut_flags is not None

    def cut_requested(self) -> bool:
        return self._cut_flags is not None and self._step_id <= self._cut_flags.upto(self.rank)

    @property
    def stops_alone(self) -> bool:
        """Whether this rank acts on a cut by itself (no tensor peers to agree with)."""
        return self._cut_flags is not None and self.tp_size == 1 and not self.votes_in_exchange

    def stop_if_cut(self) -> None:
        """Raise StepCut if the step is cut and this rank may stop alone; a no-op elsewhere."""
        if self.stops_alone and self.cut_requested():
            raise StepCut

    # tensor parallelism
    def all_reduce(self, x: torch.Tensor, check_cut: bool = False) -> torch.Tensor:
        """Sum `x` over the tensor-parallel group. With `check_cut`, this is also a cut check
        (StepCut on every rank of the stage, or on none)."""
        if self.tp_size == 1:
            if check_cut:
                self.stop_if_cut()
            return x
        if not (check_cut and self.checks_cuts) or self.votes_in_exchange:
            dist.all_reduce(x, group=self._tp())
            return x
        flat = with_cut_flag(x, self.cut_requested())
        dist.all_reduce(flat, group=self._tp())
        if flat[-1].item() > 0:
            raise StepCut
        return flat[:-1].view_as(x)

    def gather_to_first(self, local: torch.Tensor) -> torch.Tensor | None:
        """The tensor ranks' `local` parts concatenated along the last dimension on the stage's
        first tensor rank (the full-vocabulary logits from vocabulary slices); None elsewhere."""
        if self.tp_size == 1:
            return local
        dst = self.topo.rank(self.stage, 0, self.dp_rank)
        parts = [torch.empty_like(local) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(local, parts, dst=dst, group=self._tp())
        return torch.cat(parts, dim=-1) if parts is not None else None

    # pipeline parallelism
    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The hidden state [num_tokens, hidden_size] from the same tensor rank of the previous
        stage; StepCut if that stage cut the step (the message's last element)."""
        message = torch.empty(num_tokens * hidden_size + 1, dtype=dtype, device=self.device)
        dist.recv(message, src=self.topo.rank(self.stage - 1, self.tp_rank, self.dp_rank), group=self._pp())
        # Where cuts are off the flag is never read: no host read of a device tensor per step.
        if self.checks_cuts and message[-1].item() > 0:
            if not self.votes_in_exchange:
                raise StepCut
            self._carried_cut = True  # this stage stops together, at its first exchange
        return message[:-1].view(num_tokens, hidden_size)

    def send_hidden(self, hidden: torch.Tensor | None, num_tokens: int, hidden_size: int,
                    dtype: torch.dtype) -> dist.Work:
        """Pass `hidden` to the same tensor rank of the next stage, asynchronously; None passes
        the cut on instead (the next stage must not wait for a hidden state that never comes)."""
        body = hidden if hidden is not None else torch.zeros(num_tokens * hidden_size, dtype=dtype,
                                                             device=self.device)
        message = with_cut_flag(body, hidden is None)
        return dist.isend(message, dst=self.topo.rank(self.stage + 1, self.tp_rank, self.dp_rank), group=self._pp())

    # expert parallelism across data-parallel groups
    def _stage(self) -> dist.ProcessGroup:
        if self.stage_group is None:
            raise RuntimeError(f"rank {self.rank} exchanges no tokens under {self.topo} "
                               f"(built outside a worker pool, its world was left, or dp * tp is 1)")
        return self.stage_group

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """All-to-all of row counts over the stage: `counts` [ep_size, n] int64, row r for ep rank r;
        returns what every rank sent this one, [ep_size, n]. Also the cut check of the stage (see the
        module docstring): a column of votes travels with the counts, and StepCut is raised on every
        rank if any rank voted to cut."""
        vote = self._carried_cut or (self.checks_cuts and self.cut_requested())
        sent = torch.cat([counts, counts.new_full((counts.shape[0], 1), int(vote))], dim=1).to(self.device)
        got = torch.empty_like(sent)
        dist.all_to_all_single(got, sent, group=self._stage())
        got = got.cpu()  # the counts size the next exchange: the host needs them
        if self.checks_cuts and bool(got[:, -1].any()):
            raise StepCut
        return got[:, :-1]

    def exchange_rows(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """All-to-all of rows over the stage: rows[sum(send_counts[:r]) : ...] go to ep rank r, and
        the rows each rank sends this one come back in ep rank order ([sum(recv_counts), ...])."""
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=self._stage())
        return out
