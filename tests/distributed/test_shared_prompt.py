"""Shared prompts (``--share-prompt``) compute what the unshared packed rows compute.

The same pairs, in the same bins, are packed twice — each sequence whole (the unshared layout) and each
pair's prompt once with both responses attending to it — and run through the project's schedule
(``runtime.schedule.run_schedule``: CP slicing, packed params, megatron-core's 1F1B / interleaved
pipeline) on the same seeded model at each layout. Per-token response log-probs, a DPO-style loss and
every parameter gradient of this rank must agree within 1e-5 (fp32). The unshared packed layout is
itself checked against each sequence alone (``test_packed_attention.py``) and against the padded
rows in training (``test_packed_training.py``), so equality with it is equality with the plain model.

Then the check is shown to catch a rejected response that sees its chosen response (with and without
context parallelism), and training end to end: losses and grad norms of shared-prompt runs (the
default, and ``--share-prompt`` under CP) equal the ``--no-share-prompt`` run's (data and context
parallelism included), and the configurations it refuses exit 2
with one line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_tgdpo.data.packing import PackedPreferenceCollator, plan_packing
from megatron_tgdpo.models import llama
from megatron_tgdpo.models.state_dict import local_full_names, seeded_init
from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

ARCH = llama.preset("tiny", num_attention_heads=8, num_query_groups=4)  # GQA, TP up to 4
SEED, STD, PAD, BETA = 11, 0.05, 0, 0.1
ROW = 80  # one row shape for every micro-batch (pipeline parallelism needs it); divisible by TP for SP
ROW_CP = 96  # the same bins with every segment padded to 2 x CP = 4; divisible by CP x TP for SP
# (prompt, chosen, rejected): long and short prompts, a one-token prompt (nothing to share), no prompt.
LENGTHS = [(7, 6, 3), (3, 9, 2), (9, 4, 8), (2, 5, 3), (1, 4, 2), (0, 3, 3), (6, 2, 7), (5, 5, 5)]
BINS = [[0, 1, 2], [3, 4, 5], [6, 7], [1, 6]]  # four micro-batches (VPP needs a multiple of PP)


def _items() -> list[dict]:
    rng = np.random.default_rng(5)
    draw = lambda n: rng.integers(1, ARCH.vocab_size, n)  # noqa: E731 - never the pad id
    return [{"prompt": draw(p), "chosen": draw(c), "rejected": draw(r), "index": 100 + i}
            for i, (p, c, r) in enumerate(LENGTHS)]


def _batches(share: bool, *, cp: int = 1):
    items = _items()
    collate = PackedPreferenceCollator(pad_id=PAD, fixed_length=ROW if cp == 1 else ROW_CP, share_prompt=share,
                                       context_parallel_size=cp)
    return [collate([items[i] for i in b]) for b in BINS]


def _response_logps(batch, logps: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence (``[chosen; rejected]`` order), its response-token log-probs in order (the full row's:
    a context-parallel slice is gathered first, since the two layouts put different tokens on a rank)."""
    from megatron_tgdpo.runtime.schedule import context_parallel

    group = context_parallel()[2]
    ids, mask = (batch.gather_context_parallel(batch[k], group=group)[0] for k in ("sequence_ids", "loss_mask"))
    logps = batch.gather_context_parallel(logps, group=group)
    return [logps[0][(mask != 0) & (ids == n)] for n in range(batch.num_sequences)]


def _loss_fn(index, batch, logps):
    """A DPO-style loss on the sequence sums plus a small per-token term (gradients through every token).
    Under CP the sums are this rank's tokens', all-reduced with an identity gradient (as the real losses)."""
    from megatron_tgdpo.losses import all_reduce_sum_identity_grad
    from megatron_tgdpo.runtime.schedule import context_parallel

    masked = logps * batch["loss_mask"]
    sums = torch.cat([batch.sequence_sums(masked), masked.sum()[None]])
    sums = all_reduce_sum_identity_grad(sums, group=context_parallel()[2])
    pairs = batch.num_pairs
    margin = sums[:pairs] - sums[pairs : 2 * pairs]
    loss = -torch.nn.functional.logsigmoid(BETA * margin).sum() + 0.01 * sums[-1]
    return loss, pairs, (loss.detach(), [t.detach() for t in _response_logps(batch, logps.detach())])


def _run(chunks, batches, *, leaky: bool = False):
    from megatron_tgdpo.runtime.schedule import LogprobSettings, run_schedule

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    reports = run_schedule(chunks, batches, _loss_fn, forward_only=False, logprobs=LogprobSettings(fused=False))
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:  # what finalize_model_grads does for SP norm weights
        for chunk in chunks:  # (each rank's share of them depends on which tokens the row puts where)
            for p in chunk.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if ps.get_context_parallel_world_size() > 1:  # DDP sums over DP x CP: each CP rank has its tokens' share
        for chunk in chunks:
            for p in chunk.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=ps.get_context_parallel_group())
    grads = {name: p.grad.detach().clone() for name, (p, _, _) in local_full_names(chunks).items()
             if p.grad is not None}
    return reports, grads


class _SeesEverything:
    """Test-only: a rejected response whose keys are the whole row before it (its chosen response too)."""

    @staticmethod
    def blocks(bounds, prefix_of):
        blocks = []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            p = prefix_of[n] if n < len(prefix_of) else -1
            if p >= 0 and p != n - 1:
                blocks.append((start, end, bounds[p], start))  # prompt .. everything up to itself
            elif not (n + 1 < len(prefix_of) and prefix_of[n + 1] == n):
                blocks.append((bounds[p] if p >= 0 else start, end))
        return blocks


class _SeesEverythingUnderCP:
    """Test-only, context parallelism: every query of a segment with a prompt sees the whole row
    before it causally (a rejected response then sees its chosen one)."""

    @staticmethod
    def allowed(self, layout):
        mask = layout.q_pos[:, None] >= layout.k_pos[None, :]
        own = layout.q_seg[:, None] == layout.k_seg[None, :]
        if layout.q_prefix is None:
            return mask & own
        return mask & (own | (layout.q_prefix[:, None] >= 0))


def _rank(leaky: bool):
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models import layers

    layout = llama.ParallelLayout(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1,
    )
    chunks = llama.build_model(ARCH, llama.transformer_config(ARCH, layout))
    seeded_init(chunks, seed=SEED, std=STD)
    cp = layout.context_parallel_size
    unshared = _run(chunks, _batches(False, cp=cp))
    if leaky:
        layers.shared_prefix_blocks = _SeesEverything.blocks
        layers.ContextParallelAttention.allowed = _SeesEverythingUnderCP.allowed
    shared = _run(chunks, _batches(True, cp=cp))
    return unshared, shared


def _compare(unshared, shared) -> dict[str, float]:
    """Largest differences: response log-probs, losses, gradients (this rank's shards)."""
    (u_reports, u_grads), (s_reports, s_grads) = unshared, shared
    assert set(u_grads) == set(s_grads) and u_grads
    worst = {"grads": max(float((u_grads[k] - s_grads[k]).abs().max()) for k in u_grads)}
    assert len(u_reports) == len(s_reports)
    if u_reports:  # the last pipeline stage
        worst["loss"] = max(float((a[0] - b[0]).abs()) for a, b in zip(u_reports, s_reports))
        lp = 0.0
        for (_, a), (_, b) in zip(u_reports, s_reports):
            assert [t.numel() for t in a] == [t.numel() for t in b]  # same response tokens per sequence
            lp = max([lp] + [float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()])
        worst["logps"] = lp
    return worst


LAYOUTS = {
    "single": dict(world=1),
    "tp2-sp": dict(world=2, tensor_model_parallel_size=2),
    "pp2-vpp2": dict(world=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "cp2": dict(world=2, context_parallel_size=2),
    "cp2-tp2-sp": dict(world=4, context_parallel_size=2, tensor_model_parallel_size=2),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shared_prompt_equals_unshared_rows(layout):
    spec = dict(LAYOUTS[layout])
    results = run_on_ranks(spec.pop("world"), _rank, False, **spec)
    stages_with_loss = 0
    for unshared, shared in results:
        worst = _compare(unshared, shared)
        assert all(v < 1e-5 for v in worst.values()), (layout, worst)
        stages_with_loss += "loss" in worst
    assert stages_with_loss >= 1


@pytest.mark.parametrize("cp", [1, 2])
def test_a_rejected_response_seeing_its_chosen_one_is_caught(cp):
    results = run_on_ranks(cp, _rank, True, context_parallel_size=cp)
    for unshared, shared in results:
        worst = _compare(unshared, shared)
        assert worst["logps"] > 1e-3 and worst["grads"] > 1e-5, worst


def test_shared_layout_holds_each_prompt_once():
    items = _items()
    for bin_, batch, plain in zip(BINS, _batches(True), _batches(False)):
        prompts = sum(LENGTHS[i][0] for i in bin_)
        shared_prompts = sum(max(LENGTHS[i][0] - 1, 0) for i in bin_)
        assert batch.real_tokens == plain.real_tokens
        # response tokens, labels and positions per sequence are the unshared row's
        for n in range(plain.num_sequences):
            for key in ("labels", "position_ids", "input_ids"):
                a = plain[key][0][(plain["sequence_ids"][0] == n) & (plain["loss_mask"][0] != 0)]
                b = batch[key][0][(batch["sequence_ids"][0] == n) & (batch["loss_mask"][0] != 0)]
                assert torch.equal(a, b), (key, n)
        used = int((batch["sequence_ids"][0] >= 0).sum()) + shared_prompts
        assert used <= int((plain["sequence_ids"][0] >= 0).sum()) - prompts + shared_prompts + 2 * len(bin_)
    plan = plan_packing([LENGTHS[i] for i in range(len(items))], capacity=ROW, share_prompt=True)
    unshared = plan_packing([LENGTHS[i] for i in range(len(items))], capacity=ROW)
    assert plan.real_tokens == unshared.real_tokens and plan.padded_tokens < unshared.padded_tokens


def test_context_parallel_layout_splits_the_prompt_in_whole_chunks():
    """At CP 2 the shared segment holds a multiple of 2 x CP prompt tokens (never padded: both responses
    attend to all its keys), the rest starts each response; response tokens, labels and RoPE positions are
    the unshared row's, and every CP rank's positions are derivable from the host metadata alone."""
    from megatron_tgdpo.data.packing import shared_prompt_split, shared_row_positions

    assert [shared_prompt_split(p, context_parallel_size=2) for p in (0, 1, 4, 5, 7, 9)] == \
        [(0, 0), (0, 1), (0, 4), (4, 1), (4, 3), (8, 1)]
    assert [shared_prompt_split(p) for p in (0, 1, 7)] == [(0, 0), (0, 1), (6, 1)]
    for cp in (1, 2):
        used = {True: 0, False: 0}  # positions of segments that hold tokens (the rest is the row's tail)
        for batch, plain in zip(_batches(True, cp=cp), _batches(False, cp=cp)):
            for shared, b in ((True, batch), (False, plain)):
                bounds = b.segment_bounds()
                used[shared] += int((b["sequence_ids"][0] >= 0).sum()) + sum(
                    bounds[p + 1] - bounds[p] for p in set(b.prefix_of or ()) if p >= 0)
            bounds = batch.segment_bounds()
            assert all((b - a) % (2 * cp) == 0 for a, b in zip(bounds[:-1], bounds[1:])) or cp == 1
            assert np.array_equal(shared_row_positions(bounds, batch.prefix_of), batch["position_ids"][0].numpy())
            for n in range(plain.num_sequences):
                for key in ("labels", "position_ids", "input_ids"):
                    a = plain[key][0][(plain["sequence_ids"][0] == n) & (plain["loss_mask"][0] != 0)]
                    b = batch[key][0][(batch["sequence_ids"][0] == n) & (batch["loss_mask"][0] != 0)]
                    assert torch.equal(a, b), (cp, key, n)
        assert used[True] < used[False], (cp, used)


# --------------------------------------------------------------------------------------------
# Training: the same losses and grad norms; refused where it cannot work
# --------------------------------------------------------------------------------------------


def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "tiny", "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--seq-length", "64", "--lr", "3e-3", "--clip-grad", "1.0", "--seed", "11", "--loss-type", "dpo",
            "--data-cache-dir", str(tmp / "data"), "--log-dir", str(tmp / name), "--eval-iters", "0",
            "--no-tensorboard", "--pack-sequences", *extra]


def test_training_with_shared_prompts_matches_unshared(tmp_path):
    assert run_on_ranks(1, run_train, _argv(tmp_path, "unshared", "--no-share-prompt"), model_parallel=False) == [0]
    # The default shares prompts (local attention): no flag here, and the step's real/computed shows it.
    assert run_on_ranks(2, run_train, _argv(tmp_path, "shared"), model_parallel=False) == [0, 0]
    assert run_on_ranks(2, run_train, _argv(tmp_path, "shared-cp2", "--share-prompt", "--context-parallel-size", "2"),
                        model_parallel=False) == [0, 0]
    ref, got = read_metrics(tmp_path / "unshared"), read_metrics(tmp_path / "shared")
    assert len(ref) == len(got) == 3
    assert all(m["token_efficiency"] <= 1 for m in ref) and all(m["token_efficiency"] > 1 for m in got)
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    cp2 = read_metrics(tmp_path / "shared-cp2")  # the prompt split in whole 2 x CP chunks, CP's mask and RoPE
    assert len(cp2) == 3
    for a, b in zip(ref, cp2):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, ("cp2", key, a[key], b[key])


@pytest.mark.parametrize("extra,needle,te", [
    (["--pack-sequences", "--context-parallel-size", "2"], "--share-prompt does not work with --context-parallel-size 2",
     True),
    (["--no-pack-sequences"], "--share-prompt needs --pack-sequences", False),
])
def test_share_prompt_refusals_name_the_flag(tmp_path, monkeypatch, extra, needle, te):
    from megatron_tgdpo import compat
    from megatron_tgdpo.config import parse_args, validate

    monkeypatch.setattr(compat, "te_available", lambda: te)  # CP is refused on TransformerEngine attention only
    argv = [a for a in _argv(tmp_path, "refused", "--share-prompt") if a != "--pack-sequences"] + extra
    problems = validate(parse_args(argv), world_size=2, num_heads=ARCH.num_attention_heads,
                        num_query_groups=ARCH.num_query_groups, num_layers=ARCH.num_layers)
    assert [p for p in problems if "--share-prompt" in p] == [next(p for p in problems if p.startswith(needle))]
    assert all("\n" not in p for p in problems)


def _te_plan_rank():
    """The TransformerEngine path's plan (query blocks in place, keys gathered as prompt + own,
    bottom-right causal), evaluated here with plain per-block attention, equals the local attention."""
    from megatron_tgdpo.data.packing import packed_seq_params_for
    from megatron_tgdpo.models.layers import ContextParallelAttention
    from megatron_tgdpo.models.te_shared_prompt import TeQueryKeyPlan

    cfg = llama.transformer_config(ARCH, llama.ParallelLayout())
    attention = ContextParallelAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in _batches(True):
        params = packed_seq_params_for(batch)
        t = batch.shape[1]
        q = torch.randn(t, attention.heads, attention.head_dim, generator=g)
        k, v = (torch.randn(t, attention.groups, attention.head_dim, generator=g) for _ in range(2))
        local = attention(q, k, v, packed_seq_params=params)  # [t, heads * d]
        plan = TeQueryKeyPlan.build(list(params.bounds), list(params.prefix_of), device=q.device)
        kk, vv = k[plan.kv_index], v[plan.kv_index]
        cq, ck = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_kv.tolist()
        assert cq[-1] == t and ck[-1] == len(plan.kv_index)
        pieces = []
        for (q0, q1), (k0, k1) in zip(zip(cq[:-1], cq[1:]), zip(ck[:-1], ck[1:])):
            lq, lk = q1 - q0, k1 - k0
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right causal
            out = torch.nn.functional.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1)[None], kk[k0:k1].transpose(0, 1)[None], vv[k0:k1].transpose(0, 1)[None],
                attn_mask=allowed, enable_gqa=True, scale=attention.softmax_scale)
            pieces.append(out[0].transpose(0, 1).reshape(lq, -1))
        worst = max(worst, float((torch.cat(pieces) - local).abs().max()))
    return worst


def test_te_query_key_plan_equals_the_local_attention():
    (worst,) = run_on_ranks(1, _te_plan_rank)
    assert worst < 1e-5, worst
