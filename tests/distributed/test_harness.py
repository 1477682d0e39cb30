"""The multi-rank harness returns every rank's result and reports each failing rank's traceback."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from megatron_tgdpo.testing import RankFailure, run_on_ranks


def _rank_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_odd():
    if dist.get_rank() % 2:
        raise ValueError(f"rank {dist.get_rank()} broke")
    return "ok"


def test_results_in_rank_order():
    assert run_on_ranks(4, _rank_sum, model_parallel=False) == [(r, 10.0) for r in range(4)]


def test_each_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(4, _fail_on_odd, model_parallel=False)
    text = str(info.value)
    assert "2 of 4 ranks failed" in text
    assert "rank 1 broke" in text and "rank 3 broke" in text and "----- rank 0" not in text
    assert "Traceback" in text


def test_hung_rank_is_reported_not_waited_forever():
    def hang():
        if dist.get_rank() == 1:
            time.sleep(60)
        return 0

    start = time.monotonic()
    with pytest.raises(RankFailure, match="no result within"):
        run_on_ranks(2, hang, model_parallel=False, timeout=3)
    assert time.monotonic() - start < 20


def test_overhead_is_small():
    start = time.monotonic()
    for _ in range(3):
        run_on_ranks(2, _rank_sum, model_parallel=False)
    assert (time.monotonic() - start) / 3 < 2.0  # well under a second per call on an idle 2-core machine
