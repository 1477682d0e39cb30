"""A frozen model scoring several packed micro-batches per call (``runtime/frozen.py``, "Several
micro-batches per call") gives bit-for-bit the log-probs of one call per micro-batch, in the policy's
schedule, single-stage and pipelined (the group's activations in its first micro-batch's message), in
fp32 and bf16; a reference that starts as the policy scores exactly the policy's own log-probs (the
step-0 log-ratio of 0); the policy's gradients do not change."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.testing import run_on_ranks


def _grouped_vs_single(argv: list[str], per_call: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource
    from megatron_tgdpo.runtime.frozen import call_groups, logps_key
    from megatron_tgdpo.runtime.schedule import LogprobSettings, run_schedule
    from megatron_tgdpo.runtime.trainer import set_up

    cfg = parse_args(argv)
    run = set_up(cfg)
    chunks = setup.build_chunks(run.arch, cfg)
    ModelSource.of(None, seed=cfg.seed).load_into(chunks)
    policy = setup.wrap_trained(cfg, chunks, train_iters=1)
    # The reference is the policy's own start (its log-probs must equal the policy's); the guidance
    # model differs (a swapped or misplaced slice would show).
    frozen = {role: setup.build_frozen(run.arch, cfg, ModelSource.of(None, seed=seed))
              for role, seed in (("reference", cfg.seed), ("guidance", cfg.seed + 1))}
    batches = BatchSource(cfg, run.data.train_prefix, run.data.pad_id, consumed_samples=0,
                          shuffle=True).next_global_batch()
    groups = call_groups(batches, per_call=per_call, cuda=False, pipeline_shapes_vary=setup.variable_row_lengths(cfg),
                         pipeline_parallel=ps.get_pipeline_model_parallel_world_size(), context_parallel=1)

    def step(calls: int):
        seen: dict[str, list[torch.Tensor]] = {role: [] for role in (*frozen, "policy")}

        def loss_fn(index, batch, logps):
            for role in frozen:
                seen[role].append(batch[logps_key(role)].clone())
            seen["policy"].append((logps * batch["loss_mask"]).detach().clone())
            weights = torch.linspace(0.5, 1.5, logps.shape[-1], dtype=logps.dtype, device=logps.device)
            return -(logps * batch["loss_mask"] * weights).sum(), int(batch["loss_mask"].sum()), None

        for chunk in policy.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        settings = dataclasses.replace(LogprobSettings.of(cfg), frozen_per_call=calls)
        run_schedule(policy.chunks, batches, loss_fn, forward_only=False, logprobs=settings, frozen=frozen)
        return [p.main_grad.clone() for chunk in policy.chunks for p in chunk.parameters()], seen

    single_grads, single = step(1)
    grads, grouped = step(per_call)
    differences = []
    if not all(torch.equal(a, b) for a, b in zip(single_grads, grads)):
        differences.append("policy gradients")
    for role in frozen:
        if len(grouped[role]) != len(single[role]) or not all(
                torch.equal(a, b) for a, b in zip(grouped[role], single[role])):
            differences.append(f"{role} log-probs")
    if not all(torch.equal(a, b) for a, b in zip(grouped["reference"], grouped["policy"])):
        differences.append("reference vs the policy it started as")
    scored = len(single["reference"])
    distinct = scored > 0 and not torch.equal(single["reference"][0], single["guidance"][0])
    return {"differences": differences, "scored": scored, "largest_group": max(len(g) for g in groups),
            "groups": len(groups), "micro_batches": len(batches), "distinct": distinct}


CASES = {
    # one stage: the whole step's micro-batches in calls of at most 4096 positions
    "pp1-auto-fp32": (1, 0, []),
    "pp1-auto-bf16": (1, 0, ["--bf16"]),
    "pp1-auto-unshared": (1, 0, ["--no-share-prompt"]),  # the others share prompts (the default)
    # two stages, uneven groups (3 + 3 + 2): a group's activations travel in its first message
    # (unshared rows: shared ones pack these pairs into fewer micro-batches than two groups of 3 need)
    "pp2-three-fp32": (2, 3, ["--pipeline-model-parallel-size", "2", "--no-share-prompt"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_several_micro_batches_per_frozen_call_equal_one_each(tmp_path, case):
    world, per_call, extra = CASES[case]
    argv = ["--model", "tiny", "--micro-batch-size", "1", "--global-batch-size", "8", "--seq-length", "64",
            "--seed", "7", "--data-cache-dir", str(tmp_path / "data"), "--pack-sequences", *extra]
    results = run_on_ranks(world, _grouped_vs_single, argv, per_call, model_parallel=False)
    for rank, result in enumerate(results):
        assert result["differences"] == [], f"rank {rank}: {result}"
    last = [r for r in results if r["scored"]]
    assert last and all(r["distinct"] for r in last), results
    # the grouped path really ran: fewer calls than micro-batches, some of several
    assert all(r["largest_group"] > 1 and r["groups"] < r["micro_batches"] for r in results), results
    if per_call:
        assert all(r["largest_group"] == per_call for r in results), results
