"""Vocab-parallel log-probs on gloo ranks (TP = 2, 4) against float64 references of the full vocab.

Every rank builds the same full logits from one seed and keeps its vocab shard, so each rank can
compare its result and its gradient shard with the single-device answer. Collectives are counted by
wrapping ``torch.distributed``'s functions around forward and backward separately.
Tolerances as in ``tests/unit/test_logprobs.py`` (fp32: 2e-5 forward, 2e-6 gradient; bf16 gradient:
one bf16 rounding, ``2**-8`` relative).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

# Imported in the parent so that forked ranks inherit them (a rank importing megatron-core itself
# costs seconds); run_on_ranks preloads them too.
from megatron.core import parallel_state, tensor_parallel
from megatron_tgdpo.ops import fused_vocab_parallel_logprobs, vocab_parallel_logprobs
from megatron_tgdpo.testing import run_on_ranks, simulate_ddp

FWD_TOL = 2e-5
GRAD_TOL_FP32 = 2e-6
BF16_REL = 2.0**-8

_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_all_gather_base",
    "_reduce_scatter_base", "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather",
    "scatter", "send", "recv", "isend", "irecv", "barrier",
)


@contextlib.contextmanager
def count_collectives():
    """Record the name of every torch.distributed collective called inside the block (outermost
    calls only, so a collective implemented through another one counts once)."""
    calls: list[str] = []
    depth = [0]
    patched = []
    for module in (dist, dist.distributed_c10d):
        for name in _COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapper(*args, _name=name, _original=original, **kwargs):
                if depth[0] == 0:
                    calls.append(_name)
                depth[0] += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    depth[0] -= 1

            patched.append((module, name, original))
            setattr(module, name, wrapper)
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def make_logits(leading, vocab, *, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*leading, vocab, generator=gen, dtype=torch.float64) * 4.0 + 2.0
    target = torch.randint(0, vocab, leading, generator=gen)
    flat_logits, flat_target = logits.view(-1, vocab), target.view(-1)
    flat_logits[::3].scatter_add_(-1, flat_target[::3, None], torch.full_like(flat_logits[::3, :1], 25.0))
    return logits.to(dtype), target


def reference(logits, target, grad_output):
    x = logits.detach().double().requires_grad_()
    logprobs = torch.log_softmax(x, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    logprobs.backward(grad_output.double())
    return logprobs.detach(), x.grad


def grad_excess(grad, expected) -> float:
    """How far the gradient is outside its tolerance (<= 0 means within)."""
    err = (grad.double() - expected).abs()
    if grad.dtype == torch.bfloat16:
        return (err - (BF16_REL * expected.abs() + GRAD_TOL_FP32)).max().item()
    return err.max().item() - GRAD_TOL_FP32


def _tp_rank_and_size():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


# --------------------------------------------------------------------------------------------
# Plain op
# --------------------------------------------------------------------------------------------


def _plain_on_rank(*, vocab, leading, dtype, chunk_size, tp_group=None, shard_rank=None, shard_count=None):
    """This rank's shard through the op; errors against the full-vocab reference and collective names."""
    rank, size = _tp_rank_and_size() if shard_rank is None else (shard_rank, shard_count)
    logits, target = make_logits(leading, vocab, dtype=dtype)
    grad_output = torch.randn(leading, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected, expected_grad = reference(logits, target, grad_output)
    shard = vocab // size
    cols = slice(rank * shard, (rank + 1) * shard)

    x = logits[..., cols].clone().requires_grad_()
    before = x.detach().clone()
    with count_collectives() as fwd_calls:
        logprobs = vocab_parallel_logprobs(x, target, tp_group=tp_group, chunk_size=chunk_size)
    with count_collectives() as bwd_calls:
        logprobs.backward(grad_output.float())
    return dict(
        fwd_err=(logprobs.double() - expected).abs().max().item(),
        grad_excess=grad_excess(x.grad, expected_grad[..., cols]),
        dtypes=(logprobs.dtype, x.grad.dtype),
        unmodified=torch.equal(x.detach(), before),
        fwd_calls=fwd_calls,
        bwd_calls=bwd_calls,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 5], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("tp", [2, 4], ids=lambda t: f"tp{t}")
def test_plain_op_matches_full_vocab(tp, chunk_size, dtype):
    leading = (6, 4)  # megatron [s, b] -> logits [s, b, V/tp]; 24 tokens, 5 does not divide them
    results = run_on_ranks(
        tp, _plain_on_rank, vocab=384, leading=leading, dtype=dtype, chunk_size=chunk_size,
        tensor_model_parallel_size=tp,
    )
    num_chunks = 1 if chunk_size is None else -(-24 // chunk_size)
    for rank, res in enumerate(results):
        assert res["fwd_err"] < FWD_TOL, (rank, res)
        assert res["grad_excess"] <= 0, (rank, res)
        assert res["dtypes"] == (torch.float32, dtype), (rank, res)
        assert res["unmodified"], rank
        # The contract is <= 2 per chunk; the implementation does 2 for all chunks together.
        assert res["fwd_calls"] == ["all_reduce", "all_reduce"], (rank, res["fwd_calls"])
        assert len(res["fwd_calls"]) <= 2 * num_chunks
        assert res["bwd_calls"] == [], (rank, res["bwd_calls"])


def _default_group_of_one():
    return _plain_on_rank(vocab=96, leading=(10,), dtype=torch.float32, chunk_size=3)


def _explicit_group_checks():
    rank = dist.get_rank()
    return _plain_on_rank(
        vocab=96, leading=(3, 4), dtype=torch.float32, chunk_size=None,
        tp_group=dist.group.WORLD, shard_rank=rank, shard_count=dist.get_world_size(),
    )


def test_group_resolution():
    # TP=1 inside a 2-rank job: megatron's TP group has one rank, so the full vocab, no collectives.
    for res in run_on_ranks(2, _default_group_of_one, tensor_model_parallel_size=1):
        assert res["fwd_err"] < FWD_TOL and res["grad_excess"] <= 0, res
        assert res["fwd_calls"] == [] and res["bwd_calls"] == [], res
    # No megatron state at all, group passed explicitly: vocab split over the world.
    for res in run_on_ranks(2, _explicit_group_checks, model_parallel=False):
        assert res["fwd_err"] < FWD_TOL and res["grad_excess"] <= 0, res
        assert res["fwd_calls"] == ["all_reduce", "all_reduce"] and res["bwd_calls"] == [], res


def _agrees_with_megatron():
    rank, size = _tp_rank_and_size()
    logits, target = make_logits((5, 3), 192, dtype=torch.float32, seed=11)
    shard = logits[..., rank * 96:(rank + 1) * 96].contiguous()
    ours = vocab_parallel_logprobs(shard, target, chunk_size=4)
    theirs = -tensor_parallel.vocab_parallel_cross_entropy(shard.clone(), target)
    return (ours - theirs).abs().max().item()


def test_agrees_with_megatron_cross_entropy():
    for err in run_on_ranks(2, _agrees_with_megatron, tensor_model_parallel_size=2):
        assert err < 1e-5


# --------------------------------------------------------------------------------------------
# Fused LM head
# --------------------------------------------------------------------------------------------


def _fused_on_rank(*, sequence_parallel, dtype, chunk_size):
    rank, size = _tp_rank_and_size()
    seq, batch, hidden_size, vocab = 8, 2, 16, 192
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(seq, batch, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.75
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    grad_output = torch.randn(seq, batch, generator=gen, dtype=torch.float64)
    hidden, weight = hidden.to(dtype), weight.to(dtype)

    # Single-device float64 reference on the (possibly bf16-rounded) inputs.
    h_ref, w_ref = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = torch.log_softmax(h_ref @ w_ref.t(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    expected.backward(grad_output)

    rows = slice(rank * vocab // size, (rank + 1) * vocab // size)
    tokens = slice(rank * seq // size, (rank + 1) * seq // size) if sequence_parallel else slice(None)
    h = hidden[tokens].clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    with count_collectives() as fwd_calls:
        logprobs = fused_vocab_parallel_logprobs(
            h, w, target, sequence_parallel=sequence_parallel, chunk_size=chunk_size
        )
    with count_collectives() as bwd_calls:
        logprobs.backward(grad_output.float())
    return dict(
        fwd_err=(logprobs.double() - expected).abs().max().item(),
        hidden_err=(h.grad.double() - h_ref.grad[tokens]).abs().max().item(),
        weight_err=(w.grad.double() - w_ref.grad[rows]).abs().max().item(),
        grad_scale=max(h_ref.grad.abs().max().item(), w_ref.grad.abs().max().item()),
        shapes=(tuple(logprobs.shape), tuple(h.grad.shape), tuple(w.grad.shape)),
        expected_shapes=((seq, batch), tuple(h.shape), tuple(w.shape)),
        dtypes=(logprobs.dtype, h.grad.dtype, w.grad.dtype),
        fwd_calls=fwd_calls,
        bwd_calls=bwd_calls,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_fused_tp2_matches_single_device(sequence_parallel, dtype):
    results = []
    for chunk_size in (None, 3):  # 16 tokens: one chunk, and chunks that do not divide them
        results += run_on_ranks(
            2, _fused_on_rank, sequence_parallel=sequence_parallel, dtype=dtype, chunk_size=chunk_size,
            tensor_model_parallel_size=2,
        )
    # fp32: errors of H-long fp32 sums; bf16: the logits themselves are rounded to bf16 (~0.4% of
    # their size), which moves log-probs and gradients by about a percent of their scale.
    fwd_tol, grad_tol = (FWD_TOL, 1e-5) if dtype == torch.float32 else (3e-2, 1e-2)
    for res in results:
        assert res["shapes"] == res["expected_shapes"], res
        assert res["dtypes"] == (torch.float32, dtype, dtype), res
        assert res["fwd_err"] < fwd_tol, res
        assert res["hidden_err"] < grad_tol * max(1.0, res["grad_scale"]), res
        assert res["weight_err"] < grad_tol * max(1.0, res["grad_scale"]), res
        if sequence_parallel:
            # all_gather_single / reduce_scatter_single on torch >= 2.13, *_tensor before.
            fwd_calls = [c.replace("_into_tensor", "_single") for c in res["fwd_calls"]]
            bwd_calls = [c.replace("_tensor", "_single") for c in res["bwd_calls"]]
            assert fwd_calls == ["all_gather_single", "all_reduce", "all_reduce"], res
            assert bwd_calls == ["reduce_scatter_single"], res
        else:
            assert res["fwd_calls"] == ["all_reduce", "all_reduce"], res
            assert res["bwd_calls"] == ["all_reduce"], res


# --------------------------------------------------------------------------------------------
# Fused vs unfused head at TP = 2, 4, with SP, chunking and megatron DDP's main_grad
# --------------------------------------------------------------------------------------------


def _rel(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _fused_vs_unfused_on_rank(cases):
    """For each (sequence_parallel, main_grad, chunk_size, dtype): this rank's fused head against the
    unfused head (this rank's logits shard -> plain op, hidden gradient summed over TP as megatron's
    column-parallel layer does); relative errors of log-probs and both gradients."""
    rank, size = _tp_rank_and_size()
    group = parallel_state.get_tensor_model_parallel_group()
    seq, batch, hidden_size, vocab = 12, 2, 16, 384
    gen = torch.Generator().manual_seed(21)
    hidden64 = torch.randn(seq, batch, hidden_size, generator=gen, dtype=torch.float64)
    weight64 = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.75
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    grad_output = torch.randn(seq, batch, generator=gen)
    rows = slice(rank * vocab // size, (rank + 1) * vocab // size)
    out = []
    for sequence_parallel, ddp, chunk_size, dtype in cases:
        hidden, weight = hidden64.to(dtype), weight64[rows].to(dtype)
        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        expected = vocab_parallel_logprobs(h_ref @ w_ref.t(), target)
        expected.backward(grad_output)
        grad_h_ref = h_ref.grad.float()
        dist.all_reduce(grad_h_ref, group=group)

        tokens = slice(rank * seq // size, (rank + 1) * seq // size) if sequence_parallel else slice(None)
        h, w = hidden[tokens].clone().requires_grad_(), torch.nn.Parameter(weight.clone())
        main_grad = simulate_ddp(w) if ddp else None
        logprobs = fused_vocab_parallel_logprobs(
            h, w, target, sequence_parallel=sequence_parallel, chunk_size=chunk_size
        )
        logprobs.backward(grad_output)
        out.append(dict(
            case=(sequence_parallel, ddp, chunk_size, str(dtype)),
            logp_err=(logprobs - expected).abs().max().item(),
            hidden_rel=_rel(h.grad, grad_h_ref[tokens]),
            weight_rel=_rel(main_grad if ddp else w.grad, w_ref.grad),
            stray_grad=ddp and w.grad is not None,
            dtypes=(logprobs.dtype, h.grad.dtype),
        ))
    return out


@pytest.mark.parametrize("tp", [2, 4], ids=lambda t: f"tp{t}")
def test_fused_matches_unfused_head_tp_sp_main_grad(tp):
    cases = [
        (sp, ddp, chunk, torch.float32)
        for sp in (False, True) for ddp in (False, True) for chunk in (None, 5, "auto")
    ] + [(sp, True, 5, torch.bfloat16) for sp in (False, True)]
    for rank_results in run_on_ranks(tp, _fused_vs_unfused_on_rank, cases, tensor_model_parallel_size=tp):
        for res in rank_results:
            bf16 = res["case"][3] == str(torch.bfloat16)
            logp_tol, rel_tol = (2e-2, 2e-2) if bf16 else (1e-5, 1e-5)
            assert res["logp_err"] < logp_tol, res
            assert res["hidden_rel"] < rel_tol and res["weight_rel"] < rel_tol, res
            assert not res["stray_grad"], res
            assert res["dtypes"][0] == torch.float32, res
