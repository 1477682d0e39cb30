"""Host work kept off the training step's hot path, each with the same results as before:

* the batch prefetch hands out exactly the source's batches in its order, from one background thread,
  never asks the source for more than the run takes, and raises a batch's error at the step that asks
  for that batch;
* a deferred maximum (computed only when the step's metrics are reduced) equals the eager one, and is
  not computed at all for a step whose metrics are never reduced;
* the CPU device hook is paused inside the model's hot path at context parallelism 1 only, and back
  afterwards (a hard-coded ``device="cuda"`` works again);
* the profiling tool attributes backward time to the part whose forward created the autograd node.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from megatron_tgdpo import compat
from megatron_tgdpo.runtime import metrics as metrics_module
from megatron_tgdpo.runtime.metrics import StepMetrics
from megatron_tgdpo.runtime.prefetch import Prefetcher
from suite import load_tool


class _Source:
    """Numbered batches; records which thread asked for each; batch ``fail_at`` raises."""

    def __init__(self, fail_at: int = -1):
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at

    def next_global_batch(self):
        n = len(self.calls)
        self.calls.append((n, threading.current_thread().name))
        if n == self.fail_at:
            raise RuntimeError(f"batch {n} is too long")
        return [n]


def test_prefetch_keeps_the_order_runs_one_ahead_and_stops_at_the_run_end():
    source = _Source()
    prefetched = Prefetcher(source, remaining=4)
    got = [prefetched.next_global_batch() for _ in range(4)]
    assert got == [[0], [1], [2], [3]]
    assert [n for n, _ in source.calls] == [0, 1, 2, 3]  # nothing prepared beyond the run's batches
    assert source.calls[0][1] == threading.current_thread().name  # the first one: nothing to overlap
    assert all(name.startswith("batch-prefetch") for _, name in source.calls[1:])


def test_prefetch_raises_a_batch_error_at_the_step_that_asks_for_it():
    prefetched = Prefetcher(_Source(fail_at=2), remaining=5)
    assert prefetched.next_global_batch() == [0]
    assert prefetched.next_global_batch() == [1]  # batch 2 already failed in the background
    with pytest.raises(RuntimeError, match="batch 2 is too long"):
        prefetched.next_global_batch()
    prefetched.close()


def test_a_deferred_maximum_equals_the_eager_one_and_costs_nothing_unless_reduced(monkeypatch):
    monkeypatch.setattr(metrics_module, "holds_metrics", lambda *, cp_local: True)
    values = [torch.tensor([0.5, -3.25, 2.0]), torch.tensor([1.0, 2.5]), torch.tensor([-0.75])]
    eager, deferred, unreduced = StepMetrics(), StepMetrics(), StepMetrics()
    calls = []

    def later(v):
        def compute():
            calls.append(1)
            return v.abs().max()
        return compute

    for v in values:
        eager.add_max("m", v.abs().max())
        deferred.add_max_when_reduced("m", later(v))
        unreduced.add_max_when_reduced("m", later(v))
    assert calls == []
    want = eager.reduce(means=(), maxima=("m",))
    assert deferred.reduce(means=(), maxima=("m",)) == want == {"m": 3.25}
    assert len(calls) == 3  # unreduced never computes
    assert deferred.reduce(means=(), maxima=("m",)) == want and len(calls) == 3  # computed once


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device hook exists on CPU-only torch")
def test_the_device_hook_is_paused_in_the_hot_path_at_cp1_only():
    compat.apply_cpu_shims()
    a = torch.ones(3)
    with compat.count_device_hook_calls() as outside:
        torch.add(a, a)
    with compat.hot_path(context_parallel_size=1), compat.count_device_hook_calls() as hot:
        torch.add(a, a)
    with compat.hot_path(context_parallel_size=2), compat.count_device_hook_calls() as under_cp:
        torch.add(a, a)
    assert outside == [1] and hot == [0] and under_cp == [1]
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # the hook is back for megatron's cold paths


def _event(name, parent=None, *, seq=-1, us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, sequence_nr=seq, cpu_time_total=us)


def test_profile_attributes_backward_to_the_forward_part_by_sequence_number():
    profile_step = load_tool("profile_step")
    policy = _event("phase:policy forward + backward", us=100.0)
    mlp = _event("part:mlp", policy, us=30.0)
    mm = _event("aten::mm", mlp, seq=7, us=25.0)
    attention = _event("part:attention", policy, us=20.0)
    bmm = _event("aten::bmm", attention, seq=8, us=15.0)
    back_mm = _event("autograd::engine::evaluate_function: MmBackward0", policy, seq=7, us=40.0)
    nested = _event("autograd::engine::evaluate_function: Inner", back_mm, seq=8, us=5.0)
    back_bmm = _event("autograd::engine::evaluate_function: BmmBackward0", policy, seq=8, us=10.0)
    unknown = _event("autograd::engine::evaluate_function: AccumulateGrad", policy, seq=99, us=3.0)
    # the frozen models' forward runs inside the policy's schedule: its own phase, out of the policy's time
    reference = _event("phase:reference forward", policy, us=12.0)
    totals = profile_step.attribute([policy, mlp, mm, attention, bmm, back_mm, nested, back_bmm, unknown, reference])
    assert totals["policy forward + backward"] == 88.0 and totals["reference forward"] == 12.0
    assert totals[("mlp", "forward")] == 30.0 and totals[("mlp", "backward")] == 40.0
    assert totals[("attention", "forward")] == 20.0 and totals[("attention", "backward")] == 10.0  # nested: in mm's
    assert totals[("other", "backward")] == 3.0
