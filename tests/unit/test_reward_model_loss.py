"""The Bradley–Terry reward model's maths (``losses.reward_model``): the loss against a float64 reference
and TRL's RewardTrainer, where a sequence's score is read (rows and packed layouts, from the real
collator), and the per-token value differences against a hand computation."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_tgdpo.data.collate import collate_rows
from megatron_tgdpo.losses.reward_model import (bradley_terry_loss_sums, score_positions, sequence_scores,
                                                token_value_differences)


def _bt_reference(chosen: list[float], rejected: list[float], margin: float) -> tuple[float, list[float]]:
    """float64: sum of log(1 + exp(-(c - r - m))) and its derivative in each chosen score."""
    total, grads = 0.0, []
    for c, r in zip(chosen, rejected):
        z = c - r - margin
        total += math.log1p(math.exp(-z)) if z > -30 else -z
        grads.append(-1.0 / (1.0 + math.exp(z)))
    return total, grads


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_bradley_terry_loss_and_gradient_match_float64_reference(margin):
    gen = torch.Generator().manual_seed(3)
    chosen = (torch.randn(7, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    rejected = torch.randn(7, generator=gen, dtype=torch.float64) * 3
    loss, count, metrics = bradley_terry_loss_sums(chosen, rejected, margin=margin)
    want, grads = _bt_reference(chosen.tolist(), rejected.tolist(), margin)
    assert count.item() == 7
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx(grads, rel=1e-10)
    wins = sum((c > r) for c, r in zip(chosen.tolist(), rejected.tolist()))
    assert metrics["rm/accuracy"][0].item() == pytest.approx(wins)


def test_ties_count_half_in_accuracy():
    scores = torch.tensor([1.0, 2.0, 3.0])
    _, _, metrics = bradley_terry_loss_sums(scores, torch.tensor([1.0, 1.0, 4.0]))
    assert metrics["rm/accuracy"][0].item() == pytest.approx(1.5)  # tie, win, loss


def test_loss_equals_trl_reward_trainer_loss():
    trl = pytest.importorskip("trl", reason="trl is not installed in this environment (pip install trl)")
    gen = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    logits = torch.cat([chosen, rejected]).unsqueeze(-1)  # TRL's [chosen; rejected] rows, one logit each
    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=identity, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1)
    for margin in (None, 0.25):
        inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
        if margin is not None:
            inputs["margin"] = torch.full((6,), margin)
        theirs = trl.RewardTrainer.compute_loss(stub, lambda **_: SimpleNamespace(logits=logits), inputs)
        ours, count, _ = bradley_terry_loss_sums(chosen, rejected, margin=margin or 0.0)
        assert (ours / count).item() == pytest.approx(theirs.item(), rel=1e-6)


def _rows(prompts, responses, seq=12):
    return collate_rows([np.asarray(p) for p in prompts], [np.asarray(r) for r in responses], pad_id=0, seq=seq,
                        names=[str(i) for i in range(len(prompts))])


PROMPTS = [[5, 6, 7], [8], [9, 10]]
RESPONSES = [[11, 12], [13, 14, 15, 16], [17]]


def test_score_is_read_where_the_last_response_token_is_the_input():
    rows = _rows(PROMPTS, RESPONSES)
    r, c = score_positions(rows["loss_mask"])
    assert r.tolist() == [0, 1, 2]
    assert c.tolist() == [len(p) + len(s) - 1 for p, s in zip(PROMPTS, RESPONSES)]
    assert [rows["input_ids"][i, j].item() for i, j in zip(r.tolist(), c.tolist())] == [s[-1] for s in RESPONSES]


def test_packed_scores_equal_row_scores():
    rows = _rows(PROMPTS, RESPONSES)
    values = torch.randn(rows["loss_mask"].shape, generator=torch.Generator().manual_seed(1))
    lengths = [len(p) + len(s) for p, s in zip(PROMPTS, RESPONSES)]
    # One packed row: each sequence's real positions back to back, then 3 tail positions (sequence id -1).
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((3,), -1)]).unsqueeze(0)
    mask = torch.cat([rows["loss_mask"][i, :n] for i, n in enumerate(lengths)] + [torch.zeros(3)]).unsqueeze(0)
    packed_values = torch.cat([values[i, :n] for i, n in enumerate(lengths)] + [torch.full((3,), float("nan"))])
    got = sequence_scores(packed_values.unsqueeze(0), mask, sequence_ids=ids, num_sequences=3)
    want = sequence_scores(values, rows["loss_mask"])
    assert got.tolist() == want.tolist()
    assert want.tolist() == [values[i, n - 1].item() for i, n in enumerate(lengths)]


def test_token_value_differences_by_hand_and_telescoping():
    rows = _rows(PROMPTS, RESPONSES)
    values = torch.arange(36, dtype=torch.float64).reshape(3, 12) ** 2 / 7.0
    values[:, -1] = float("inf")  # never read: padding
    diffs = token_value_differences(values, rows["loss_mask"])
    for i, (p, s) in enumerate(zip(PROMPTS, RESPONSES)):
        for t in range(12):
            want = values[i, t + 1] - values[i, t] if len(p) - 1 <= t < len(p) + len(s) - 1 else 0.0
            assert diffs[i, t].item() == pytest.approx(float(want), abs=1e-12)
        # They sum to the sequence score minus the value after the prompt.
        assert diffs[i].sum().item() == pytest.approx((values[i, len(p) + len(s) - 1] - values[i, len(p) - 1]).item())


def test_a_sequence_without_response_tokens_is_refused():
    mask = torch.zeros(2, 5)
    mask[0, 1:3] = 1
    with pytest.raises(ValueError, match="no response tokens"):
        score_positions(mask)
