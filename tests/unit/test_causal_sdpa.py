"""``compat.causal_sdpa``: the CPU path runs long sequences in query chunks under a band mask; it
must be causal attention exactly (float64 softmax reference), forward and backward, at every length
around the chunk edges, with grouped-query K/V."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tgdpo import compat


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention written out in float64: [b, h, s, d] queries, [b, g, s, d] keys/values."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    s = q.shape[2]
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("length", [1, 5, 127, 128, 129, 255, 256, 257, 300, 513])
@pytest.mark.parametrize("heads,groups", [(4, 2), (2, 2)])
def test_matches_float64_causal_attention(length: int, heads: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(length * 10 + heads)
    shape = (2, heads, length, 16)
    q = torch.randn(shape, generator=gen)
    k = torch.randn(2, groups, length, 16, generator=gen)
    v = torch.randn(2, groups, length, 16, generator=gen)
    grad = torch.randn(shape, generator=gen)
    scale = 1 / math.sqrt(16)

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compat.causal_sdpa(*inputs, scale=scale)
    out.backward(grad)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_inputs, scale)
    ref.backward(grad.double())

    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=5e-5)


def test_gradients_through_the_models_layout():
    """As the local attention calls it: [s, b, h, d] tensors permuted in, the output laid back out as
    [s, b, h * d], so the gradient reaching the chunks is a non-contiguous view."""
    gen = torch.Generator().manual_seed(7)
    s, b = 300, 2
    q, k, v = (torch.randn(s, b, h, 16, generator=gen) for h in (4, 2, 2))
    grad = torch.randn(s, b, 4 * 16, generator=gen)

    def run(fn, q, k, v):
        out = fn(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        out.permute(2, 0, 1, 3).reshape(s, b, -1).backward(grad.to(out.dtype))
        return out

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = run(lambda *t: compat.causal_sdpa(*t, scale=0.25), *inputs)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = run(lambda *t: reference(*t, 0.25), *ref_inputs)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=5e-5)


def test_long_sequences_are_chunked_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked path is what runs (a causal square, then masked chunks over key prefixes, forward
    and backward), not a silent fallback; dropout keeps one call (its random stream unchanged)."""
    forward_op, backward_op = compat._cpu_flash_ops()
    calls = []

    def spy(op, name):
        def run(q, k, v, *args, **kwargs):
            calls.append((name, q.shape[2], k.shape[2], kwargs.get("attn_mask") is not None))
            return op(q, k, v, *args, **kwargs)
        return run

    def spy_backward(grad, q, k, v, *args, **kwargs):
        calls.append(("backward", q.shape[2], k.shape[2], kwargs.get("attn_mask") is not None))
        return backward_op(grad, q, k, v, *args, **kwargs)

    monkeypatch.setattr(compat, "_cpu_flash_ops", lambda: (spy(forward_op, "forward"), spy_backward))
    chunk = compat.CPU_CAUSAL_CHUNK
    q = torch.randn(1, 2, 2 * chunk + 3, 8, requires_grad=True)
    compat.causal_sdpa(q, q, q, scale=1.0).sum().backward()
    spans = [(chunk, chunk, False), (chunk, 2 * chunk, True), (3, 2 * chunk + 3, True)]
    assert calls == [("forward", *s) for s in spans] + [("backward", *s) for s in spans]
    calls.clear()
    compat.causal_sdpa(q, q, q, scale=1.0, dropout_p=0.1)
    assert calls == []


def test_bench_attention_prints_every_shape_and_refuses_a_wrong_chunked_result(capsys, monkeypatch):
    from suite import load_tool

    bench = load_tool("bench_attention")
    assert bench.main(["--shapes", "2x150", "1x40", "--rounds", "2", "--head-dim", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("forward + backward") and "chunk 128" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["2x150", "1x40"]
    assert all(float(r[-1]) > 0 and float(r[-2]) > 0 for r in rows)
    # A chunked path that lets queries see later keys is caught before anything is timed.
    monkeypatch.setattr(compat, "causal_sdpa", lambda q, k, v, *, scale, dropout_p=0.0:
                        compat.grouped_query_sdpa(q, k, v, scale=scale))
    with pytest.raises(SystemExit, match="differs from one causal call"):
        bench.main(["--shapes", "2x150", "--rounds", "1", "--head-dim", "8"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "4x"])
