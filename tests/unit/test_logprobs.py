"""Single-process (TP=1) checks of megatron_tgdpo.ops log-prob kernels against float64 references.

Tolerances:
* fp32 logits: forward < 2e-5 and gradient < 2e-6 absolute against float64 ``log_softmax`` autograd.
* bf16 logits: the forward reference is float64 ``log_softmax`` of the *same* bf16 values, and the op
  computes in fp32, so the forward keeps the fp32 tolerance. The gradient is computed in fp32 and then
  rounded once to bf16 (the contract: gradient dtype = logits dtype), so it may differ from the exact
  value by half a bf16 ulp, i.e. at most ``2**-8 * |exact|`` relative (8 significand bits), plus the
  fp32 error. Anything beyond that is a real error, not rounding.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_tgdpo.ops import fused_vocab_parallel_logprobs, vocab_parallel_logprobs
from megatron_tgdpo.ops.logprobs import resolve_tp_group
from megatron_tgdpo.testing import simulate_ddp

FWD_TOL = 2e-5
GRAD_TOL_FP32 = 2e-6
BF16_REL = 2.0**-8


def make_logits(
    leading: tuple[int, ...], vocab: int, *, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a spread of scales, some tokens confidently predicted (logprob near 0) and some
    targets far in the tail, plus matching targets."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*leading, vocab, generator=gen, dtype=torch.float64) * 4.0 + 2.0
    target = torch.randint(0, vocab, leading, generator=gen)
    flat_logits, flat_target = logits.view(-1, vocab), target.view(-1)
    flat_logits[::3].scatter_add_(-1, flat_target[::3, None], torch.full_like(flat_logits[::3, :1], 25.0))
    return logits.to(dtype), target


def reference(
    logits: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-probs and their gradient w.r.t. logits, via plain autograd on the full vocab."""
    x = logits.detach().double().requires_grad_()
    logprobs = torch.log_softmax(x, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    logprobs.backward(grad_output.double())
    return logprobs.detach(), x.grad


def assert_grad_close(grad: torch.Tensor, expected: torch.Tensor) -> None:
    err = (grad.double() - expected).abs()
    if grad.dtype == torch.bfloat16:
        bound = BF16_REL * expected.abs() + GRAD_TOL_FP32
        assert bool((err <= bound).all()), f"bf16 grad off by {(err - bound).max().item():.3g} beyond rounding"
    else:
        assert err.max().item() < GRAD_TOL_FP32, f"grad error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("leading", [(40,), (5, 8), (2, 3, 7)], ids=["2d", "3d", "4d"])
def test_matches_float64_log_softmax(dtype, chunk_size, leading):
    logits, target = make_logits(leading, 257, dtype=dtype)
    grad_output = torch.randn(leading, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, expected_grad = reference(logits, target, grad_output)

    x = logits.clone().requires_grad_()
    logprobs = vocab_parallel_logprobs(x, target, chunk_size=chunk_size)
    assert logprobs.dtype == torch.float32 and logprobs.shape == target.shape
    assert (logprobs.double() - expected).abs().max().item() < FWD_TOL
    logprobs.backward(grad_output.float())
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    assert_grad_close(x.grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_input_not_modified(dtype, chunk_size):
    logits, target = make_logits((6, 4), 300, dtype=dtype)
    x = logits.clone().requires_grad_()
    vocab_parallel_logprobs(x, target, chunk_size=chunk_size).sum().backward()
    assert torch.equal(x.detach(), logits)  # forward and backward leave the caller's logits alone


def test_chunking_does_not_change_gradients():
    logits, target = make_logits((33,), 500, dtype=torch.float32)
    grads = []
    for chunk_size in (None, 4, 33, 1000):
        x = logits.clone().requires_grad_()
        vocab_parallel_logprobs(x, target, chunk_size=chunk_size).sum().backward()
        grads.append(x.grad)
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=1e-7)


def test_masked_vocab_entries_and_non_contiguous_input():
    # [b, s, V] transposed to megatron's [s, b, V] without a copy; -inf entries (masked padding) must
    # neither produce nan nor receive gradient.
    logits, target = make_logits((3, 5), 128, dtype=torch.float32)
    logits[..., 100:] = float("-inf")
    target = target % 100
    x = logits.clone().requires_grad_()
    logprobs = vocab_parallel_logprobs(x.transpose(0, 1), target.t(), chunk_size=4)
    expected, expected_grad = reference(logits.transpose(0, 1), target.t(), torch.ones(5, 3, dtype=torch.float64))
    assert torch.isfinite(logprobs).all()
    assert (logprobs.double() - expected).abs().max().item() < FWD_TOL
    logprobs.sum().backward()
    assert_grad_close(x.grad.transpose(0, 1), expected_grad)
    assert torch.equal(x.grad[..., 100:], torch.zeros_like(x.grad[..., 100:]))


def test_no_tokens():
    x = torch.randn(0, 4, 50, requires_grad=True)
    logprobs = vocab_parallel_logprobs(x, torch.zeros(0, 4, dtype=torch.long), chunk_size=3)
    assert logprobs.shape == (0, 4)
    logprobs.sum().backward()
    assert x.grad.shape == x.shape


class LargeAllocations(TorchDispatchMode):
    """Records every op output whose storage holds more than ``limit_bytes`` (views included, so a
    slice of a large buffer reports that buffer): ``(op, storage bytes, storage address)``."""

    def __init__(self, limit_bytes: int):
        super().__init__()
        self.limit_bytes = limit_bytes
        self.large: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > self.limit_bytes:
                storage = tensor.untyped_storage()
                self.large.append((str(func), storage.nbytes(), storage.data_ptr()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_memory_is_one_chunk_buffer(dtype):
    """With chunk_size, no buffer larger than one fp32 [chunk, V] exists besides the input and, in
    backward, the returned gradient; without it, a full-shard fp32 buffer does (so the check can fail)."""
    tokens, vocab, chunk = 40, 257, 4
    logits, target = make_logits((tokens,), vocab, dtype=dtype)
    x = logits.clone().requires_grad_()
    input_ptr = x.untyped_storage().data_ptr()
    limit = chunk * vocab * 4

    with LargeAllocations(limit) as forward:
        out = vocab_parallel_logprobs(x, target, chunk_size=chunk)
    assert [a for a in forward.large if a[2] != input_ptr] == []
    with LargeAllocations(limit) as backward:
        out.sum().backward()
    buffers = {(nbytes, ptr) for _, nbytes, ptr in backward.large if ptr != input_ptr}
    assert buffers == {(tokens * vocab * dtype.itemsize, x.grad.untyped_storage().data_ptr())}, backward.large

    with LargeAllocations(limit) as unchunked:
        vocab_parallel_logprobs(x, target)
    assert any(nbytes == tokens * vocab * 4 for _, nbytes, ptr in unchunked.large if ptr != input_ptr)


def test_fused_never_materialises_logits():
    tokens, vocab, hidden_size = 64, 1000, 8
    hidden, weight, target = make_head(tokens, 1, hidden_size, vocab, dtype=torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # Anything a quarter the size of the full [tokens, V] fp32 logits or more; the chunk buffers are
    # 4 rows, the weight gradient [V, H] is an eighth of it.
    with LargeAllocations(tokens * vocab) as recorder:
        fused_vocab_parallel_logprobs(h, w, target, chunk_size=4).sum().backward()
    assert recorder.large == []
    with LargeAllocations(tokens * vocab) as recorder:
        vocab_parallel_logprobs(h @ w.t(), target).sum()
    assert recorder.large != []  # the unfused head does, so the recorder can see it


def test_single_process_needs_no_group():
    assert resolve_tp_group(None) is None


@pytest.mark.parametrize(
    "logits, target, error, match",
    [
        (torch.randn(4, 10), torch.zeros(5, dtype=torch.long), ValueError, "target shape"),
        (torch.randn(4, 10), torch.zeros(4, 1, dtype=torch.long), ValueError, "target shape"),
        (torch.randn(4, 10), torch.zeros(4), TypeError, "integer tensor"),
        (torch.randint(0, 3, (4, 10)), torch.zeros(4, dtype=torch.long), TypeError, "floating-point"),
        (torch.tensor(1.0), torch.tensor(0), ValueError, "vocab"),
        (torch.randn(4, 0), torch.zeros(4, dtype=torch.long), ValueError, "vocab"),
    ],
    ids=["short", "extra-dim", "float-target", "int-logits", "scalar", "empty-vocab"],
)
def test_bad_inputs_raise(logits, target, error, match):
    with pytest.raises(error, match=match):
        vocab_parallel_logprobs(logits, target)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# Fused LM head + log-probs
# --------------------------------------------------------------------------------------------


def make_head(seq: int, batch: int, hidden_size: int, vocab: int, *, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, batch, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5 * 3
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    return hidden.to(dtype), weight.to(dtype), target


def plain_head(hidden, weight, target, grad_output):
    """The unfused reference: logits ``hidden @ weight.T``, then the plain op, backward done; returns the
    leaf copies (their ``.grad`` set) and the log-probs."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = vocab_parallel_logprobs(h @ w.t(), target)
    expected.backward(grad_output)
    return h, w, expected


def run_fused(hidden, weight, target, grad_output, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs = fused_vocab_parallel_logprobs(h, w, target, **kwargs)
    logprobs.backward(grad_output)
    return logprobs.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 4096], ids=lambda c: f"chunk{c}")
def test_fused_fp32_matches_float64_head(chunk_size):
    hidden, weight, target = make_head(7, 3, 16, 200, dtype=torch.float32)
    grad_output = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    logprobs, grad_hidden, grad_weight = run_fused(hidden, weight, target, grad_output, chunk_size=chunk_size)

    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = torch.log_softmax(h @ w.t(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    expected.backward(grad_output.double())
    assert logprobs.dtype == torch.float32
    assert (logprobs.double() - expected).abs().max().item() < FWD_TOL
    # The head multiplies the logits gradient by H-sized rows, so allow for the longer fp32 sums.
    torch.testing.assert_close(grad_hidden.double(), h.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_weight.double(), w.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_matches_unfused_head(dtype, chunk_size):
    hidden, weight, target = make_head(6, 2, 32, 150, dtype=dtype, seed=3)
    grad_output = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    logprobs, grad_hidden, grad_weight = run_fused(hidden, weight, target, grad_output, chunk_size=chunk_size)

    h, w, expected = plain_head(hidden, weight, target, grad_output)
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(grad_hidden, h.grad, rtol=0, atol=2e-6)
        torch.testing.assert_close(grad_weight, w.grad, rtol=0, atol=2e-6)
    else:
        # Both paths round the logits, the logits gradient and the matmul outputs to bf16, possibly in a
        # different order of accumulation: allow a few bf16 ulps of the gradient scale.
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-2)
        torch.testing.assert_close(grad_hidden.float(), h.grad.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad_weight.float(), w.grad.float(), rtol=2e-2, atol=2e-2)


def test_fused_accumulates_weight_grad_and_leaves_inputs_alone():
    hidden, weight, target = make_head(4, 2, 8, 40, dtype=torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_vocab_parallel_logprobs(h, w, target, chunk_size=3).sum().backward()
    first = w.grad.clone()
    fused_vocab_parallel_logprobs(h, w, target, chunk_size=3).sum().backward()
    torch.testing.assert_close(w.grad, 2 * first)
    assert torch.equal(h.detach(), hidden) and torch.equal(w.detach(), weight)


def test_fused_no_tokens():
    h, w = torch.randn(0, 2, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    out = fused_vocab_parallel_logprobs(h, w, torch.zeros(0, 2, dtype=torch.long), chunk_size=3)
    assert out.shape == (0, 2)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == h.shape


def test_fused_frozen_weight_gets_no_grad():
    hidden, weight, target = make_head(4, 2, 8, 40, dtype=torch.float32)
    h = hidden.clone().requires_grad_()
    fused_vocab_parallel_logprobs(h, weight, target).sum().backward()
    assert h.grad is not None and weight.grad is None


_H, _W, _T = torch.randn(4, 2, 8), torch.randn(10, 8), torch.zeros(4, 2, dtype=torch.long)


@pytest.mark.parametrize(
    "hidden, weight, target, kwargs, error, match",
    [
        (_H, torch.randn(10, 7), _T, {}, ValueError, "weight must be"),
        (_H, torch.randn(10, 8, 1), _T, {}, ValueError, "weight must be"),
        (_H, _W, torch.zeros(4, dtype=torch.long), {}, ValueError, "target shape"),
        (_H, _W.double(), _T, {}, TypeError, "same dtype"),
        (_H, _W, torch.zeros(4, 2), {}, TypeError, "integer"),
        (torch.randn(8), _W, torch.tensor(0), {"sequence_parallel": True}, ValueError, "sequence"),
        (_H, _W, _T, {"chunk_size": 0}, ValueError, "chunk_size"),
    ],
    ids=["hidden-size", "weight-3d", "target-shape", "dtype", "float-target", "sp-no-seq-dim", "chunk"],
)
def test_fused_bad_inputs_raise(hidden, weight, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused_vocab_parallel_logprobs(hidden, weight, target, **kwargs)


# --------------------------------------------------------------------------------------------
# Chunks by bytes, and the fused op's weight gradient into megatron DDP's main_grad
# --------------------------------------------------------------------------------------------


def test_chunk_tokens_by_bytes():
    from megatron_tgdpo.ops import DEFAULT_CHUNK_BYTES, chunk_tokens

    assert chunk_tokens(128256, budget_bytes=256 * 2**20) == 523  # 523 * 128256 * 4 B <= 256 MiB
    assert 523 * 128256 * 4 <= 256 * 2**20 < 524 * 128256 * 4
    assert chunk_tokens(128256 // 8, budget_bytes=256 * 2**20) == 4185
    assert chunk_tokens(1000, budget_bytes=10) == 1  # never zero tokens
    assert chunk_tokens(128256) == chunk_tokens(128256, budget_bytes=DEFAULT_CHUNK_BYTES)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="shard_vocab"):
            chunk_tokens(bad)
        with pytest.raises(ValueError, match="budget_bytes"):
            chunk_tokens(10, budget_bytes=bad)


def test_fused_chunk_size_auto_and_bad_string():
    hidden, weight, target = make_head(6, 2, 8, 50, dtype=torch.float32)
    grad_output = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    auto = run_fused(hidden, weight, target, grad_output)  # default: "auto"
    one = run_fused(hidden, weight, target, grad_output, chunk_size=None)
    for a, b in zip(auto, one):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_vocab_parallel_logprobs(hidden, weight, target, chunk_size="big")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64, "auto"], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("ddp", [False, True], ids=["plain-param", "main_grad"])
def test_fused_fp32_matches_plain_head_with_and_without_main_grad(ddp, chunk_size):
    """fp32: values and both gradients within 1e-5 relative of the unfused head, through DDP's main_grad or
    autograd's .grad; two backward passes accumulate."""
    hidden, weight, target = make_head(9, 3, 24, 300, dtype=torch.float32, seed=5)
    grad_output = torch.randn(9, 3, generator=torch.Generator().manual_seed(6))
    h_ref, w_ref, expected = plain_head(hidden, weight, target, grad_output)

    h, w = hidden.clone().requires_grad_(), torch.nn.Parameter(weight.clone())
    main_grad = simulate_ddp(w) if ddp else None
    for step in range(2):
        logprobs = fused_vocab_parallel_logprobs(h, w, target, chunk_size=chunk_size)
        logprobs.backward(grad_output)
        assert (logprobs - expected).abs().max().item() < 1e-5
        grad_weight = main_grad if ddp else w.grad
        assert rel_err(h.grad, (step + 1) * h_ref.grad) < 1e-5
        assert rel_err(grad_weight, (step + 1) * w_ref.grad) < 1e-5
        if ddp:
            assert w.grad is None and not w.grad_added_to_main_grad


def test_fused_tied_weight_main_grad_gets_both_uses():
    """Tied embeddings on one stage: the same parameter is also used by the input embedding (through
    autograd). Its main_grad must hold the embedding's gradient (added by DDP's hook) plus the head's
    (added by the op)."""
    vocab, hidden_size, seq, batch = 120, 16, 7, 2
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.3
    tokens = torch.randint(0, vocab, (seq, batch), generator=gen)
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    mix = torch.randn(hidden_size, hidden_size, generator=gen) / hidden_size**0.5

    def head_input(w):
        return torch.tanh(torch.nn.functional.embedding(tokens, w) @ mix)

    w_ref = weight.clone().requires_grad_()
    vocab_parallel_logprobs(head_input(w_ref) @ w_ref.t(), target).sum().backward()

    w = torch.nn.Parameter(weight.clone())
    main_grad = simulate_ddp(w)
    fused_vocab_parallel_logprobs(head_input(w), w, target, chunk_size=3).sum().backward()
    assert w.grad is None
    assert rel_err(main_grad, w_ref.grad) < 1e-5


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32-main-grad", "bf16-main-grad"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_bf16_weight_main_grad(grad_dtype, chunk_size):
    """bf16 weights: the weight gradient reaches main_grad rounded once to bf16 per element (like the
    unfused head's bf16 gradient that DDP adds), and agrees with the unfused head to bf16 precision."""
    hidden, weight, target = make_head(6, 2, 32, 150, dtype=torch.bfloat16, seed=3)
    grad_output = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    h_ref, w_ref, expected = plain_head(hidden, weight, target, grad_output)

    h, w = hidden.clone().requires_grad_(), torch.nn.Parameter(weight.clone())
    main_grad = simulate_ddp(w, grad_dtype)
    logprobs = fused_vocab_parallel_logprobs(h, w, target, chunk_size=chunk_size)
    logprobs.backward(grad_output)
    assert w.grad is None and main_grad.dtype == grad_dtype and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-2)
    torch.testing.assert_close(h.grad.float(), h_ref.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(main_grad.float(), w_ref.grad.float(), rtol=2e-2, atol=2e-2)
    # Against float64 on the same bf16 inputs: within the rounding of the bf16 logits (a few 1e-3).
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    torch.log_softmax(h64 @ w64.t(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1).backward(grad_output.double())
    assert rel_err(main_grad, w64.grad) < 2e-2 and rel_err(h.grad, h64.grad) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ddp", [False, True], ids=["plain-param", "main_grad"])
def test_fused_backward_allocates_no_per_chunk_weight_gradients(ddp, dtype):
    """Backward allocates nothing the size of the weight gradient with main_grad, and exactly one such
    buffer (the returned gradient) without; no tensor of the full logits size either way."""
    tokens, vocab, hidden_size, chunk = 64, 1024, 16, 4
    hidden, weight, target = make_head(tokens, 1, hidden_size, vocab, dtype=dtype)
    h, w = hidden.clone().requires_grad_(), torch.nn.Parameter(weight.clone())
    existing = {w.untyped_storage().data_ptr()}  # views of the weight and of main_grad are no allocation
    if ddp:
        existing.add(simulate_ddp(w).untyped_storage().data_ptr())
    out = fused_vocab_parallel_logprobs(h, w, target, chunk_size=chunk)
    weight_bytes = vocab * hidden_size * dtype.itemsize
    # Anything at least half a weight gradient (the per-tile buffers are 4 x 1024 elements).
    with LargeAllocations(weight_bytes // 2) as recorder:
        out.sum().backward()
    big = {(nbytes, ptr) for _, nbytes, ptr in recorder.large if ptr not in existing}
    if ddp:
        assert big == set(), recorder.large
    else:
        assert big == {(weight_bytes, w.grad.untyped_storage().data_ptr())}, recorder.large
    assert all(nbytes < tokens * vocab * 4 for _, nbytes, _ in recorder.large)


def test_fused_weight_main_grad_guards():
    hidden, weight, target = make_head(4, 2, 8, 40, dtype=torch.float32)
    w = torch.nn.Parameter(weight.clone())
    w.main_grad = torch.zeros(40, 9)
    with pytest.raises(ValueError, match="main_grad"):
        fused_vocab_parallel_logprobs(hidden, w, target).sum().backward()
    w = torch.nn.Parameter(weight.clone())
    w.main_grad = torch.zeros_like(w)
    w.__fsdp_param__ = True
    with pytest.raises(NotImplementedError, match="FSDP"):
        fused_vocab_parallel_logprobs(hidden, w, target).sum().backward()
