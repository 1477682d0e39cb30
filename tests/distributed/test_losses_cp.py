"""preference_loss under context parallelism equals the single-rank loss, token for token.

Each sequence's T tokens are cut into 2*CP chunks and rank r keeps chunks r and 2*CP-1-r (the
load-balanced layout megatron-core uses for causal attention; re-implemented here so the test does
not depend on megatron's helper). Every rank must return the same loss as the CP=1 computation and,
for each token it holds, the same gradient. Agreement is to float32 rounding, not bitwise: the
per-sequence sums are added in a different order (partial sums per rank, then the all-reduce), which
moves the loss by a few float32 ulps (observed <= 1.5e-7 relative; checked to 5e-7). Across the ranks
of one run the loss and metrics are bitwise identical, since every rank evaluates them from the same
all-reduced sums.

One ``run_on_ranks`` call per CP size covers every loss type (the harness forks, so closures and
the tensors they capture reach the ranks for free).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from megatron.core import parallel_state

from megatron_tgdpo.losses import preference_loss
from megatron_tgdpo.testing import run_on_ranks

NUM_PAIRS = 3
SEQ_LEN = 24  # divisible by 2*CP for CP = 2 and 4

CASES = {
    "dpo": dict(loss_type="dpo", beta=0.5),
    "dpo_label_smoothing": dict(loss_type="dpo", beta=0.5, label_smoothing=0.1),
    "tgdpo": dict(loss_type="tgdpo", beta=0.5, alpha=1.5),
    "tgdpo_clamp": dict(loss_type="tgdpo", beta=0.5, alpha=1.5, weight_clamp=(0.0, 2.0)),
    "tgdpo_no_guide": dict(loss_type="tgdpo", beta=0.5, use_guide=False),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, use_ref=False),
}


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt/response/padding masks with different lengths per row; garbage at masked positions."""
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * NUM_PAIRS
    mask = torch.zeros(rows, SEQ_LEN, dtype=torch.int64)
    for row in range(rows):
        prompt = int(torch.randint(1, 10, (1,), generator=generator))
        response = int(torch.randint(2, SEQ_LEN - prompt + 1, (1,), generator=generator))
        mask[row, prompt : prompt + response] = 1
    ref = -5.0 * torch.rand(rows, SEQ_LEN, generator=generator) - 0.1
    policy = ref + 0.3 * torch.randn(rows, SEQ_LEN, generator=generator)
    guide = ref + 1.5 * torch.randn(rows, SEQ_LEN, generator=generator)
    garbage = 1e4 * torch.randn(rows, SEQ_LEN, generator=generator)
    masked = mask == 0
    return dict(
        policy=torch.where(masked, garbage, policy),
        ref=torch.where(masked, -garbage, ref),
        guide=torch.where(masked, garbage, guide),
        mask=mask,
    )


def shard(tensor: torch.Tensor, *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Rank ``cp_rank``'s tokens: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``2*cp_size``."""
    chunks = tensor.reshape(tensor.shape[0], 2 * cp_size, -1)
    return torch.cat([chunks[:, cp_rank], chunks[:, 2 * cp_size - 1 - cp_rank]], dim=-1)


def unshard(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's part, in rank order."""
    cp_size = len(parts)
    half = parts[0].shape[1] // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for cp_rank, part in enumerate(parts):
        chunks[cp_rank] = part[:, :half]
        chunks[2 * cp_size - 1 - cp_rank] = part[:, half:]
    return torch.cat(chunks, dim=-1)


def run_case(batch: dict[str, torch.Tensor], case: dict, *, cp_size: int = 1, cp_rank: int = 0, cp_group=None):
    """(loss, grad of this rank's policy tokens, metrics, grad of a parameter feeding the logps)."""
    options = dict(case)
    use_guide, use_ref = options.pop("use_guide", True), options.pop("use_ref", True)
    local = {name: shard(value, cp_size=cp_size, cp_rank=cp_rank) for name, value in batch.items()}
    # A scalar "model parameter" that every token's log-prob depends on: its gradient on one rank is
    # only the part through that rank's tokens; the true gradient is the sum over CP ranks.
    scale = torch.ones((), requires_grad=True)
    policy = local["policy"].clone().requires_grad_()
    loss, metrics = preference_loss(
        policy * scale,
        local["ref"] if use_ref else None,
        local["mask"],
        guide_logps=local["guide"] if use_guide else None,
        cp_group=cp_group,
        **options,
    )
    loss.backward()
    return loss.detach(), policy.grad, metrics, scale.grad


def to_numpy(tree: Any) -> Any:
    """Tensors -> numpy arrays (exact copies) for the trip back to the parent.

    Tensors pickled across the harness pipe travel as shared-memory handles that the parent fetches
    from the rank *after* reading the pipe; a rank that has already exited by then makes the parent's
    recv fail with ConnectionResetError. numpy arrays pickle by value.
    """
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    if isinstance(tree, dict):
        return {key: to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_numpy(value) for value in tree)
    return tree


def to_torch(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    if isinstance(tree, dict):
        return {key: to_torch(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_torch(value) for value in tree)
    return tree


def cp_rank_main(batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
    group = parallel_state.get_context_parallel_group()
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    return to_numpy(
        {
            name: run_case(batch, case, cp_size=cp_size, cp_rank=cp_rank, cp_group=group)
            for name, case in CASES.items()
        }
    )


def close(a: torch.Tensor, b: torch.Tensor, *, rel: float = 1e-6) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("cp_size", [2, 4])
def test_cp_loss_and_token_gradients_equal_single_rank(cp_size: int) -> None:
    batch = make_batch(seed=cp_size)
    per_rank = to_torch(run_on_ranks(cp_size, cp_rank_main, batch, context_parallel_size=cp_size))

    for name, case in CASES.items():
        want_loss, want_grad, want_metrics, want_scale_grad = run_case(batch, case)
        results = [rank_results[name] for rank_results in per_rank]
        for cp_rank, (loss, _, metrics, _) in enumerate(results):
            # the same all-reduced sums on every rank -> bitwise-equal loss and metrics across ranks
            assert torch.equal(loss, results[0][0]), (name, cp_rank)
            assert metrics.keys() == want_metrics.keys(), name
            for metric, value in metrics.items():
                assert torch.equal(value, results[0][2][metric]), (name, metric, cp_rank)
                want = want_metrics[metric]
                assert close(value, want), (name, metric, float(value), float(want))
            assert close(loss, want_loss, rel=5e-7), (name, float(loss), float(want_loss))

        grad = unshard([token_grad for _, token_grad, _, _ in results])
        assert close(grad, want_grad), (name, float((grad - want_grad).abs().max()))
        assert torch.all(grad[batch["mask"] == 0] == 0), name

        # The DDP rule in docs/loss.md: the parameter gradient is the SUM of the ranks' local ones;
        # megatron DDP averages over CP, so each rank backpropagates cp_size * loss.
        scale_grads = torch.stack([scale_grad for *_, scale_grad in results])
        assert close(scale_grads.sum(), want_scale_grad, rel=1e-5), name
        assert close((cp_size * scale_grads).mean(), want_scale_grad, rel=1e-5), name
        assert not close(scale_grads[0], want_scale_grad, rel=1e-3), name  # one rank alone is not it
