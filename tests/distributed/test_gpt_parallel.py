"""A tiny Llama-style megatron-core GPTModel at TP=2, PP=2 (and SP, CP=2) matches one rank.

The reference is a single-rank run of the same model (same full weights) with plain autograd; the
parallel runs load those weights through ``load_full_state_dict`` and compare logits and gradients.
"""
from __future__ import annotations

import pytest
import torch

from megatron_tgdpo.models import llama
from megatron_tgdpo.models.state_dict import gather_shards, load_full_state_dict, local_full_names
from megatron_tgdpo.testing import run_on_ranks

B, S, N_MICRO = 2, 16, 4  # 4 micro-batches: 1F1B reaches its steady state (both directions at once)
ARCH = llama.preset("tiny", num_attention_heads=8, num_query_groups=4)  # GQA, TP up to 4


def _inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, ARCH.vocab_size, (N_MICRO, B, S), generator=g)
    # Scaled so gradients are O(1): the 1e-5 bounds below are then absolute *and* meaningful.
    loss_weights = torch.randn(N_MICRO, B, S, ARCH.vocab_size, generator=g) / ARCH.vocab_size**0.5
    return tokens, loss_weights


def _positions():
    return torch.arange(S).expand(B, S)


def _reference():
    cfg = llama.transformer_config(ARCH, llama.ParallelLayout())
    model = llama.build_model(ARCH, cfg)[0]
    tokens, weights = _inputs()
    logits, total = [], 0.0
    for mb in range(N_MICRO):
        out = model(tokens[mb], _positions(), attention_mask=None)  # [b, s, V]
        logits.append(out.detach())
        total = total + (out * weights[mb]).sum() / N_MICRO
    total.backward()
    full = {name: p.detach().clone() for name, (p, _, _) in local_full_names([model]).items()}
    grads = {name: p.grad.detach().clone() for name, (p, _, _) in local_full_names([model]).items()}
    return full, torch.stack(logits), grads


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(1, _reference)[0]


def _tp_or_sp_rank(full, sequence_parallel: bool):
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = llama.transformer_config(
        ARCH, llama.ParallelLayout(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    )
    chunks = llama.build_model(ARCH, cfg)
    load_full_state_dict(chunks, full)
    model = chunks[0]
    tokens, weights = _inputs()
    r, shard = ps.get_tensor_model_parallel_rank(), ARCH.vocab_size // tp
    logits = []
    for mb in range(N_MICRO):
        out = model(tokens[mb], _positions(), attention_mask=None)
        logits.append(out.detach())
        # Each rank back-propagates its vocab shard's part of the loss; the column-parallel output
        # layer's backward all-reduce sums the hidden-state gradient across shards.
        ((out * weights[mb][..., r * shard : (r + 1) * shard]).sum() / N_MICRO).backward()
    if sequence_parallel:
        # What megatron-core's finalize_model_grads does for params flagged ``sequence_parallel``
        # (our RMSNorm weights): each rank saw only its sequence slice, so sum over TP.
        flagged = [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]
        assert flagged, "no norm weight is flagged for sequence-parallel gradient reduction"
        for p in flagged:
            torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    grads = {name: (p.grad.detach().clone(), dim, stride) for name, (p, dim, stride) in local_full_names(chunks).items()}
    return torch.stack(logits), grads


@pytest.mark.parametrize("tp,sequence_parallel", [(2, False), (2, True), (4, False)])
def test_tensor_parallel_matches_single_rank(reference, tp, sequence_parallel):
    full, ref_logits, ref_grads = reference
    results = run_on_ranks(tp, _tp_or_sp_rank, full, sequence_parallel, tensor_model_parallel_size=tp)
    logits = torch.cat([r[0] for r in results], dim=-1)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for name, ref in ref_grads.items():
        _, dim, stride = results[0][1][name]
        shards = [r[1][name][0] for r in results]
        got = gather_shards(shards, dim=dim, stride=stride) if dim >= 0 else shards[0]
        if dim < 0:
            for other in shards[1:]:
                torch.testing.assert_close(other, got, atol=1e-6, rtol=0, msg=f"{name}: replicas disagree")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{name} gradient")


def _pp_rank(full, vpp):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = ps.get_pipeline_model_parallel_world_size()
    cfg = llama.transformer_config(
        ARCH,
        llama.ParallelLayout(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp),
    )
    chunks = llama.build_model(ARCH, cfg)
    load_full_state_dict(chunks, full)
    tokens, weights = _inputs()
    outputs = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(tokens[mb], _positions(), attention_mask=None)

        def loss_func(output):
            outputs.append(output.detach())
            return (output * weights[mb]).sum(), {}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(range(N_MICRO)) for _ in chunks] if vpp else iter(range(N_MICRO)),
        model=chunks,
        num_microbatches=N_MICRO,
        seq_length=S,
        micro_batch_size=B,
        forward_only=False,
    )
    grads = {name: p.grad.detach().clone() for name, (p, _, _) in local_full_names(chunks).items()}
    return (torch.stack(outputs) if outputs else None), grads


@pytest.mark.parametrize("pp,vpp", [(2, None), (2, 2)])
def test_pipeline_parallel_matches_single_rank(reference, pp, vpp):
    full, ref_logits, ref_grads = reference
    results = run_on_ranks(
        pp, _pp_rank, full, vpp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
    )
    torch.testing.assert_close(results[-1][0], ref_logits, atol=1e-5, rtol=0)
    merged = {}
    for _, grads in results:
        assert not set(grads) & set(merged), "a parameter lives on two pipeline stages"
        merged.update(grads)
    assert set(merged) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(merged[name], ref, atol=1e-5, rtol=0, msg=f"{name} gradient")


def _cp_rank(full):
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.layers import cp_chunk_positions

    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    cfg = llama.transformer_config(ARCH, llama.ParallelLayout(context_parallel_size=cp))
    chunks = llama.build_model(ARCH, cfg)
    load_full_state_dict(chunks, full)
    tokens, weights = _inputs()
    idx = cp_chunk_positions(local_len=S // cp, cp_rank=rank, cp_size=cp, device=torch.device("cpu"))
    logits = []
    for mb in range(N_MICRO):
        out = chunks[0](tokens[mb][:, idx], _positions()[:, idx], attention_mask=None)
        logits.append(out.detach())
        ((out * weights[mb][:, idx]).sum() / N_MICRO).backward()
    # Parameters are replicated over CP: the true gradient is the sum of each rank's part.
    grads = {}
    for name, (p, _, _) in local_full_names(chunks).items():
        g = p.grad.detach().clone()
        torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
        grads[name] = g
    return idx, torch.stack(logits), grads


def test_context_parallel_matches_single_rank(reference):
    full, ref_logits, ref_grads = reference
    results = run_on_ranks(2, _cp_rank, full, context_parallel_size=2)
    for idx, logits, grads in results:
        torch.testing.assert_close(logits, ref_logits[:, :, idx], atol=1e-5, rtol=0)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=0, msg=f"{name} gradient")
