"""Step metrics kept on the device as (sum, count) pairs and reduced once, when they are logged.

Inside the pipeline schedule nothing is converted to a Python number (that would stall a GPU
schedule on every micro-batch); :meth:`StepMetrics.reduce` does one SUM all-reduce (and one MAX
all-reduce for maxima) over all ranks and returns plain floats: means are global sum / global count,
so they are exact whatever the number of pairs or tokens each micro-batch or rank held.

Who contributes: one rank per data-parallel replica holds each value — TP rank 0 of the last pipeline
stage, and CP rank 0 for *CP-global* values (computed identically on every CP rank, e.g. the preference
loss from all-reduced sequence sums) or every CP rank for *CP-local* values (sums over the tokens a
rank holds, e.g. token cross-entropy).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["StepMetrics", "holds_metrics"]


def holds_metrics(*, cp_local: bool) -> bool:
    """Whether this rank holds its data-parallel replica's copy of a last-stage result (step metrics,
    scored log-probs): TP rank 0 of the last pipeline stage, and CP rank 0 unless ``cp_local``."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True) or ps.get_tensor_model_parallel_rank() != 0:
        return False
    return cp_local or ps.get_context_parallel_rank() == 0


class StepMetrics:
    """name -> on-device (sum, count), and name -> on-device max."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.deferred: list[tuple[str, Callable[[], torch.Tensor]]] = []

    def add(self, values: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, cp_local: bool = False) -> None:
        if not holds_metrics(cp_local=cp_local):
            return
        for name, (total, count) in values.items():
            total, count = total.detach().double(), count.detach().double()
            if name in self.sums:
                old_total, old_count = self.sums[name]
                total, count = old_total + total, old_count + count
            self.sums[name] = (total, count)

    def add_max(self, name: str, value: torch.Tensor, *, cp_local: bool = False) -> None:
        if not holds_metrics(cp_local=cp_local):
            return
        self._fold_max(name, value)

    def add_max_when_reduced(self, name: str, compute: Callable[[], torch.Tensor], *, cp_local: bool = False) -> None:
        """:meth:`add_max` of ``compute()``, evaluated only if these metrics are reduced (a logged step):
        for a value nothing but the log reads. The calls run in the order they were added, so the
        result is the one :meth:`add_max` would have given; ``compute`` must read tensors the step does
        not modify afterwards."""
        if holds_metrics(cp_local=cp_local):
            self.deferred.append((name, compute))

    def _fold_max(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.maxima[name] = torch.maximum(self.maxima[name], value) if name in self.maxima else value

    def reduce(self, *, means: Iterable[str], maxima: Iterable[str] = (), device: Optional[torch.device] = None,
               group=None) -> dict[str, float]:
        """Global values of ``means`` (sum / count) and ``maxima``; collective: every rank calls it
        with the same names. A name nobody recorded comes back as nan."""
        means, maxima = list(means), list(maxima)
        for name, compute in self.deferred:
            self._fold_max(name, compute())
        self.deferred = []
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        vec = torch.zeros(2 * len(means), dtype=torch.float64, device=device)
        for i, name in enumerate(means):
            if name in self.sums:
                vec[2 * i], vec[2 * i + 1] = self.sums[name]
        out: dict[str, float] = {}
        if means:
            if dist.is_initialized():
                dist.all_reduce(vec, group=group)
            values = vec.tolist()
            for i, name in enumerate(means):
                total, count = values[2 * i], values[2 * i + 1]
                out[name] = total / count if count > 0 else float("nan")
        if maxima:
            top = torch.full((len(maxima),), float("-inf"), dtype=torch.float64, device=device)
            for i, name in enumerate(maxima):
                if name in self.maxima:
                    top[i] = self.maxima[name]
            if dist.is_initialized():
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            out.update({name: (v if v != float("-inf") else float("nan")) for name, v in zip(maxima, top.tolist())})
        return out
