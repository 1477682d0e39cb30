"""Frozen models scored inside the policy's schedule (``runtime/frozen.py``) give bit-for-bit what a
separate forward-only pass per model gives (``score_logps``), and leave the policy's gradients exactly
as a schedule without them, at pipeline (variable and fixed message shapes), virtual-stage, sequence-
and context-parallel layouts; ``score_frozen`` (all frozen models in one pass) equals them too."""
from __future__ import annotations

import pytest
import torch

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import run_on_ranks


def _compare(argv: list[str]) -> dict:
    """One global batch: the policy's step with and without the frozen models in its schedule, and
    each frozen model scored alone; what differs, per rank."""
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource
    from megatron_tgdpo.runtime.frozen import logps_key
    from megatron_tgdpo.runtime.schedule import LogprobSettings, run_schedule, score_frozen, score_logps
    from megatron_tgdpo.runtime.trainer import set_up

    cfg = parse_args(argv)
    run = set_up(cfg)
    settings = LogprobSettings.of(cfg)
    chunks = setup.build_chunks(run.arch, cfg)
    ModelSource.of(None, seed=cfg.seed).load_into(chunks)
    policy = setup.wrap_trained(cfg, chunks, train_iters=1)
    # Two frozen models that differ from each other and from the policy: swapped values would show.
    frozen = {role: setup.build_frozen(run.arch, cfg, ModelSource.of(None, seed=seed))
              for role, seed in (("reference", 101), ("guidance", 202))}
    batches = BatchSource(cfg, run.data.train_prefix, run.data.pad_id, consumed_samples=0,
                          shuffle=True).next_global_batch()
    alone = {role: score_logps(models, batches, logprobs=settings) for role, models in frozen.items()}
    together = score_frozen(frozen, batches, logprobs=settings)

    def step(with_frozen: bool):
        seen: dict[str, list[torch.Tensor]] = {role: [] for role in frozen}

        def loss_fn(index, batch, logps):
            for role in frozen:
                if with_frozen:
                    seen[role].append(batch[logps_key(role)].clone())
            weights = torch.linspace(0.5, 1.5, logps.shape[-1], dtype=logps.dtype, device=logps.device)  # a gradient with structure
            return -(logps * batch["loss_mask"] * weights).sum(), int(batch["loss_mask"].sum()), None

        for chunk in policy.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        run_schedule(policy.chunks, batches, loss_fn, forward_only=False, logprobs=settings,
                     frozen=frozen if with_frozen else None)
        grads = [p.main_grad.clone() for chunk in policy.chunks for p in chunk.parameters()]
        return grads, seen

    plain_grads, _ = step(False)
    grads, seen = step(True)
    differences = []
    if not all(torch.equal(a, b) for a, b in zip(plain_grads, grads)):
        differences.append("policy gradients")
    for role in frozen:
        if len(seen[role]) != len(alone[role]) or not all(torch.equal(a, b) for a, b in zip(seen[role], alone[role])):
            differences.append(f"{role} log-probs in the policy's schedule")
        if not all(torch.equal(a, b) for a, b in zip(together[role], alone[role])):
            differences.append(f"{role} log-probs of score_frozen")
    distinct = bool(alone["reference"]) and not torch.equal(alone["reference"][0], alone["guidance"][0])
    moved = any(float(g.abs().sum()) > 0 for g in grads)
    return {"differences": differences, "scored": len(alone["reference"]), "distinct": distinct, "moved": moved}


LAYOUTS = {
    # variable message shapes (packed rows exchange their shape), two frozen models' parts in each message
    "pp2-packed": ["--pipeline-model-parallel-size", "2", "--pack-sequences"],
    # fixed shapes: every row --seq-length, the schedule told the message is 3 x as long
    "pp2-vpp2-rows": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
                      "--no-pack-sequences"],
    "tp2-sp-rows": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--no-pack-sequences"],
    "cp2-packed": ["--context-parallel-size", "2", "--pack-sequences"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_frozen_models_in_the_policy_schedule_equal_separate_passes(tmp_path, layout):
    argv = ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "8", "--seq-length", "64",
            "--seed", "7", "--data-cache-dir", str(tmp_path / "data"), *LAYOUTS[layout]]
    results = run_on_ranks(2, _compare, argv, model_parallel=False)
    last = [r for r in results if r["scored"]]
    assert last, results  # some rank is the last pipeline stage and saw log-probs
    for rank, result in enumerate(results):
        assert result["differences"] == [], f"rank {rank}: {result}"
    assert all(r["distinct"] for r in last) and any(r["moved"] for r in results), results
