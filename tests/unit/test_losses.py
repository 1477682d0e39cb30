"""preference_loss / tgdpo_token_weights against a plain float64 re-statement of the formulas.

The reference below is written from the method's definition, token by token with python loops, and
shares no code with ``megatron_tgdpo.losses``. Masked positions of the inputs hold large garbage in
every comparison, so any leak of a prompt/padding value into the loss, metrics or gradients shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from megatron_tgdpo.losses import preference_loss, tgdpo_token_weights

NUM_PAIRS = 4
SEQ_LEN = 24


# --------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    policy: torch.Tensor  # [2B, T] float32
    ref: torch.Tensor
    guide: torch.Tensor
    mask: torch.Tensor  # [2B, T] int64, 1 on response tokens


def make_mask(generator: torch.Generator, *, rows: int, seq_len: int) -> torch.Tensor:
    """Prompt, then response, then padding; lengths differ per row, one row has no padding."""
    mask = torch.zeros(rows, seq_len, dtype=torch.int64)
    for row in range(rows):
        prompt = int(torch.randint(1, seq_len // 3, (1,), generator=generator))
        response = int(torch.randint(1, seq_len - prompt + 1, (1,), generator=generator))
        if row == 1:
            response = seq_len - prompt  # response runs to the last position
        mask[row, prompt : prompt + response] = 1
    return mask


def make_batch(
    seed: int = 0, *, num_pairs: int = NUM_PAIRS, seq_len: int = SEQ_LEN, guide_scale: float = 1.5
) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    ref = -6.0 * torch.rand(rows, seq_len, generator=generator, dtype=torch.float64) - 0.05
    policy = ref + 0.3 * torch.randn(rows, seq_len, generator=generator, dtype=torch.float64)
    guide = ref + guide_scale * torch.randn(rows, seq_len, generator=generator, dtype=torch.float64)
    mask = make_mask(generator, rows=rows, seq_len=seq_len)
    garbage = 1e4 * torch.randn(rows, seq_len, generator=generator, dtype=torch.float64)
    masked = mask == 0
    return Batch(
        policy=torch.where(masked, garbage, policy).float(),
        ref=torch.where(masked, -garbage, ref).float(),
        guide=torch.where(masked, 3 * garbage, guide).float(),
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# Float64 reference, written per pair and per token
# --------------------------------------------------------------------------------------------


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x))


def scalar(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def reference(
    batch: Batch,
    *,
    loss_type: str,
    beta: float = 0.1,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    weight_clamp: tuple[float | None, float | None] | None = None,
    simpo_gamma: float = 0.5,
    use_guide: bool = True,
) -> tuple[float, torch.Tensor, dict[str, float]]:
    """(loss, d loss / d policy [2B, T] float64, metrics) from the definitions."""
    policy = batch.policy.detach().double().requires_grad_()
    rows, seq_len = policy.shape
    num_pairs = rows // 2
    guided = loss_type == "tgdpo" and use_guide

    per_row = []
    weights_seen = {"chosen": [], "rejected": []}
    clamped_count = 0
    for row in range(rows):
        is_chosen = row < num_pairs
        sum_logp = torch.zeros((), dtype=torch.float64)
        sum_logratio = torch.zeros((), dtype=torch.float64)
        sum_weighted = torch.zeros((), dtype=torch.float64)
        length = 0
        for t in range(seq_len):
            if int(batch.mask[row, t]) == 0:
                continue
            logp = policy[row, t]
            ref_logp = float(batch.ref[row, t])
            logratio = logp - ref_logp
            weight = 1.0
            if guided:
                token_reward = beta * (float(batch.guide[row, t]) - ref_logp)
                weight = 1.0 + alpha * token_reward if is_chosen else 1.0 - alpha * token_reward
                if weight_clamp is not None:
                    low, high = weight_clamp
                    unclamped = weight
                    if low is not None:
                        weight = max(weight, low)
                    if high is not None:
                        weight = min(weight, high)
                    clamped_count += weight != unclamped
                weights_seen["chosen" if is_chosen else "rejected"].append(weight)
            sum_logp = sum_logp + logp
            sum_logratio = sum_logratio + logratio
            sum_weighted = sum_weighted + weight * logratio
            length += 1
        per_row.append(dict(logp=sum_logp, logratio=sum_logratio, weighted=sum_weighted, length=length))

    pair_losses, logits, chosen_rewards, rejected_rewards = [], [], [], []
    for pair in range(num_pairs):
        win, lose = per_row[pair], per_row[num_pairs + pair]
        if loss_type in ("dpo", "tgdpo"):
            h = beta * (win["weighted"] - lose["weighted"])
        elif loss_type == "ipo":
            h = win["logratio"] / win["length"] - lose["logratio"] / lose["length"]
        else:  # simpo
            h = beta * (win["logp"] / win["length"] - lose["logp"] / lose["length"]) - simpo_gamma
        if loss_type == "ipo":
            loss = (h - 1.0 / (2.0 * beta)) ** 2
        else:
            loss = -(1.0 - label_smoothing) * log_sigmoid(h) - label_smoothing * log_sigmoid(-h)
        pair_losses.append(loss)
        logits.append(scalar(h))
        if loss_type == "simpo":
            chosen_rewards.append(beta * scalar(win["logp"]) / win["length"])
            rejected_rewards.append(beta * scalar(lose["logp"]) / lose["length"])
        else:
            chosen_rewards.append(beta * scalar(win["logratio"]))
            rejected_rewards.append(beta * scalar(lose["logratio"]))

    total = sum(pair_losses) / num_pairs
    (grad,) = torch.autograd.grad(total, policy)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    metrics = {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracy": mean([float(c > r) for c, r in zip(chosen_rewards, rejected_rewards)]),
        "rewards/margin": mean([c - r for c, r in zip(chosen_rewards, rejected_rewards)]),
        "logps/chosen": mean([scalar(per_row[i]["logp"]) for i in range(num_pairs)]),
        "logps/rejected": mean([scalar(per_row[num_pairs + i]["logp"]) for i in range(num_pairs)]),
        "logits/mean": mean(logits),
    }
    if guided:
        every_weight = weights_seen["chosen"] + weights_seen["rejected"]
        metrics["weights/chosen_mean"] = mean(weights_seen["chosen"])
        metrics["weights/rejected_mean"] = mean(weights_seen["rejected"])
        metrics["weights/negative_fraction"] = mean([float(w < 0) for w in every_weight])
        if weight_clamp is not None:
            metrics["weights/clamped_fraction"] = clamped_count / len(every_weight)
    return scalar(total), grad, metrics


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def run_loss(batch: Batch, *, with_ref: bool = True, with_guide: bool = True, **kwargs):
    """(loss, grad w.r.t. policy, metrics) from the module under test."""
    policy = batch.policy.clone().requires_grad_()
    loss, metrics = preference_loss(
        policy,
        batch.ref if with_ref else None,
        batch.mask,
        guide_logps=batch.guide if with_guide else None,
        **kwargs,
    )
    loss.backward()
    return loss.detach(), policy.grad, metrics


# name -> preference_loss keyword arguments (the float64 reference takes the same ones)
CASES = {
    "dpo": dict(loss_type="dpo"),
    "dpo_beta": dict(loss_type="dpo", beta=0.5),
    "dpo_label_smoothing": dict(loss_type="dpo", beta=0.5, label_smoothing=0.2),
    "tgdpo_defaults": dict(loss_type="tgdpo"),
    "tgdpo_negative_weights": dict(loss_type="tgdpo", beta=0.5, alpha=1.5),
    "tgdpo_clamp": dict(loss_type="tgdpo", beta=0.5, alpha=1.5, weight_clamp=(0.0, 2.0)),
    "tgdpo_clamp_low_only": dict(loss_type="tgdpo", beta=0.5, alpha=1.5, weight_clamp=(0.25, None)),
    "tgdpo_label_smoothing": dict(loss_type="tgdpo", beta=0.5, alpha=1.5, label_smoothing=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "ipo_default_beta": dict(loss_type="ipo"),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0),
    "simpo_default_gamma_label_smoothing": dict(loss_type="simpo", beta=2.0, label_smoothing=0.15),
}


def assert_metrics_close(metrics: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        got = metrics[name]
        assert got.dtype == torch.float32 and got.dim() == 0 and not got.requires_grad, name
        assert abs(float(got) - value) <= 1e-5 * max(1.0, abs(value)), (name, float(got), value)


# --------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(name: str, seed: int) -> None:
    kwargs = CASES[name]
    batch = make_batch(seed)
    # SimPO is reference-free: run it without ref_logps (the reference ignores them too).
    loss, grad, metrics = run_loss(batch, with_ref=kwargs["loss_type"] != "simpo", **kwargs)
    want_loss, want_grad, want_metrics = reference(batch, **kwargs)

    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(float(loss) - want_loss) < 1e-5, (float(loss), want_loss)
    assert (grad.double() - want_grad).abs().max() < 1e-6
    assert torch.all(grad[batch.mask == 0] == 0)
    assert_metrics_close(metrics, want_metrics)


def test_reference_cases_exercise_negative_and_clamped_weights() -> None:
    """The data must actually contain |r| > 1/alpha tokens, or the comparisons above prove less."""
    _, _, metrics = run_loss(make_batch(0), **CASES["tgdpo_clamp"])
    _, _, unclamped = run_loss(make_batch(0), **CASES["tgdpo_negative_weights"])
    assert float(unclamped["weights/negative_fraction"]) > 0.05
    assert float(metrics["weights/clamped_fraction"]) > 0.05
    assert float(metrics["weights/negative_fraction"]) == 0.0


def test_default_coefficients_reach_negative_weights_with_large_guide_gaps() -> None:
    batch = make_batch(3, guide_scale=40.0)  # beta * |guide - ref| > 1 / alpha = 2 needs gaps > 20
    loss, grad, metrics = run_loss(batch, loss_type="tgdpo")
    want_loss, want_grad, want_metrics = reference(batch, loss_type="tgdpo")
    assert float(metrics["weights/negative_fraction"]) > 0.1
    assert abs(float(loss) - want_loss) < 1e-5
    assert (grad.double() - want_grad).abs().max() < 1e-6
    assert_metrics_close(metrics, want_metrics)


@pytest.mark.parametrize("weight_clamp", [None, (0.0, 2.0), (None, 1.2)])
def test_token_weights_match_definition(weight_clamp) -> None:
    batch = make_batch(2)
    beta, alpha = 0.5, 1.5
    weights = tgdpo_token_weights(
        batch.guide, batch.ref, batch.mask, beta=beta, alpha=alpha, weight_clamp=weight_clamp
    )
    rows, seq_len = batch.mask.shape
    assert weights.shape == (rows, seq_len) and not weights.requires_grad
    for row in range(rows):
        for t in range(seq_len):
            if int(batch.mask[row, t]) == 0:
                assert float(weights[row, t]) == 0.0
                continue
            token_reward = beta * (float(batch.guide[row, t]) - float(batch.ref[row, t]))
            want = 1.0 + alpha * token_reward if row < rows // 2 else 1.0 - alpha * token_reward
            if weight_clamp is not None:
                low, high = weight_clamp
                want = want if low is None else max(want, low)
                want = want if high is None else min(want, high)
            assert abs(float(weights[row, t]) - want) < 1e-5 * max(1.0, abs(want)), (row, t)


# --------------------------------------------------------------------------------------------
# TGDPO reduces to DPO
# --------------------------------------------------------------------------------------------


def assert_same_run(a, b, *, ignore_weight_metrics: bool = True) -> None:
    loss_a, grad_a, metrics_a = a
    loss_b, grad_b, metrics_b = b
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)

    def keep(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in metrics.items() if not (ignore_weight_metrics and k.startswith("weights/"))}

    kept_a, kept_b = keep(metrics_a), keep(metrics_b)
    assert kept_a.keys() == kept_b.keys()
    for name in kept_a:
        if name != "logits/mean":  # unchanged too, but checked via the loss already
            assert torch.equal(kept_a[name], kept_b[name]), name


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_alpha_zero_is_dpo_exactly(label_smoothing: float) -> None:
    batch = make_batch(4, guide_scale=40.0)
    dpo = run_loss(batch, loss_type="dpo", beta=0.3, label_smoothing=label_smoothing)
    tgdpo = run_loss(batch, loss_type="tgdpo", beta=0.3, alpha=0.0, label_smoothing=label_smoothing)
    assert_same_run(dpo, tgdpo)
    assert float(tgdpo[2]["weights/chosen_mean"]) == 1.0 == float(tgdpo[2]["weights/rejected_mean"])


def test_guide_equal_to_ref_is_dpo_exactly() -> None:
    batch = make_batch(5)
    batch.guide = batch.ref.clone()
    assert_same_run(run_loss(batch, loss_type="dpo"), run_loss(batch, loss_type="tgdpo", alpha=2.0))


def test_unit_weights_by_clamp_is_dpo_exactly() -> None:
    """f == 1 on every token (forced by the clamp [1, 1]) is DPO, whatever the guide says."""
    batch = make_batch(6, guide_scale=40.0)
    assert_same_run(
        run_loss(batch, loss_type="dpo"), run_loss(batch, loss_type="tgdpo", weight_clamp=(1.0, 1.0))
    )
    weights = tgdpo_token_weights(batch.ref, batch.ref, batch.mask, beta=0.1, alpha=0.5)
    assert torch.equal(weights, batch.mask.float())


def test_tgdpo_without_guide_is_dpo_with_dpo_metrics() -> None:
    batch = make_batch(7)
    dpo = run_loss(batch, loss_type="dpo")
    unguided = run_loss(batch, loss_type="tgdpo", with_guide=False, weight_clamp=(0.0, 2.0))
    assert_same_run(dpo, unguided, ignore_weight_metrics=False)
    # dpo ignores a guide it is given
    assert_same_run(dpo, run_loss(batch, loss_type="dpo", with_guide=True), ignore_weight_metrics=False)


def test_tgdpo_differs_from_dpo_when_guided() -> None:
    """Guards the exact-equality tests above against a loss that ignores the guide altogether."""
    batch = make_batch(8)
    assert not torch.equal(run_loss(batch, loss_type="dpo")[0], run_loss(batch, loss_type="tgdpo", alpha=1.0)[0])


# --------------------------------------------------------------------------------------------
# Gradients, masking, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dpo", "tgdpo", "ipo", "simpo"])
def test_no_gradient_into_ref_or_guide(loss_type: str) -> None:
    batch = make_batch(9)
    policy = batch.policy.clone().requires_grad_()
    ref = batch.ref.clone().requires_grad_()
    guide = batch.guide.clone().requires_grad_()
    loss, metrics = preference_loss(policy, ref, batch.mask, guide_logps=guide, loss_type=loss_type)
    loss.backward()
    assert ref.grad is None and guide.grad is None
    assert policy.grad is not None and policy.grad.abs().sum() > 0
    assert all(not value.requires_grad for value in metrics.values())

    frozen_policy = batch.policy.clone()
    loss, _ = preference_loss(frozen_policy, ref, batch.mask, guide_logps=guide, loss_type=loss_type)
    assert not loss.requires_grad  # a loss built from ref/guide alone would be differentiable
    weights = tgdpo_token_weights(guide, ref, batch.mask, beta=0.1, alpha=0.5)
    assert not weights.requires_grad


@pytest.mark.parametrize("name", ["dpo", "tgdpo_clamp", "ipo", "simpo"])
def test_masked_garbage_including_inf_and_nan_does_not_matter(name: str) -> None:
    clean = make_batch(10)
    masked = clean.mask == 0
    zero = torch.zeros(())
    clean.policy = torch.where(masked, zero, clean.policy)
    clean.ref = torch.where(masked, zero, clean.ref)
    clean.guide = torch.where(masked, zero, clean.guide)

    dirty = make_batch(10)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 3e38, -3e38])
    noise = specials[torch.arange(masked.numel()).reshape(masked.shape) % len(specials)]
    dirty.policy = torch.where(masked, noise, clean.policy)
    dirty.ref = torch.where(masked, noise.roll(1), clean.ref)
    dirty.guide = torch.where(masked, noise.roll(2), clean.guide)

    kwargs = CASES[name]
    want = run_loss(clean, **kwargs)
    got = run_loss(dirty, **kwargs)
    assert_same_run(want, got, ignore_weight_metrics=False)
    assert torch.all(got[1][masked] == 0)


def test_mask_dtypes_are_equivalent() -> None:
    batch = make_batch(11)
    runs = []
    for mask in (batch.mask, batch.mask.bool(), batch.mask.float(), batch.mask.to(torch.int32)):
        batch_with_mask = Batch(policy=batch.policy, ref=batch.ref, guide=batch.guide, mask=mask)
        runs.append(run_loss(batch_with_mask, loss_type="tgdpo", alpha=1.0))
    for other in runs[1:]:
        assert_same_run(runs[0], other, ignore_weight_metrics=False)


def test_float64_inputs_give_float32_metrics() -> None:
    batch = make_batch(12)
    policy = batch.policy.double().requires_grad_()
    loss, metrics = preference_loss(policy, batch.ref.double(), batch.mask, guide_logps=batch.guide.double())
    assert loss.dtype == torch.float64
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in metrics.values())


def test_metric_keys_per_loss_type() -> None:
    batch = make_batch(13)
    base = {
        "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
        "logps/chosen", "logps/rejected", "logits/mean",
    }  # fmt: skip
    weights = {"weights/chosen_mean", "weights/rejected_mean", "weights/negative_fraction"}
    assert set(run_loss(batch, loss_type="dpo")[2]) == base
    assert set(run_loss(batch, loss_type="ipo")[2]) == base
    assert set(run_loss(batch, loss_type="simpo")[2]) == base
    assert set(run_loss(batch, loss_type="tgdpo")[2]) == base | weights
    assert set(run_loss(batch, loss_type="tgdpo", weight_clamp=(0, None))[2]) == base | weights | {
        "weights/clamped_fraction"
    }


def test_defaults_are_tgdpo_beta_0_1_alpha_0_5() -> None:
    batch = make_batch(14, guide_scale=10.0)
    loss, _, _ = run_loss(batch)
    want_loss, _, _ = reference(batch, loss_type="tgdpo", beta=0.1, alpha=0.5)
    assert abs(float(loss) - want_loss) < 1e-5


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def call(batch: Batch, **kwargs):
    return preference_loss(batch.policy, batch.ref, batch.mask, guide_logps=batch.guide, **kwargs)


def test_unknown_options_are_named() -> None:
    with pytest.raises(TypeError, match="label_smothing.*weight_clip|weight_clip.*label_smothing"):
        call(make_batch(), label_smothing=0.1, weight_clip=(0, 1))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(loss_type="kto"), ValueError, "loss_type"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(label_smoothing=0.7), ValueError, "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing"),
        (dict(loss_type="dpo", weight_clamp=(0.0, 2.0)), ValueError, "weight_clamp"),
        (dict(loss_type="dpo", simpo_gamma=1.0), ValueError, "simpo_gamma"),
        (dict(weight_clamp=(2.0, 1.0)), ValueError, "weight_clamp"),
        (dict(weight_clamp=0.5), TypeError, "weight_clamp"),
        (dict(weight_clamp=(0.0, 1.0, 2.0)), TypeError, "weight_clamp"),
    ],
)
def test_bad_arguments(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        call(make_batch(), **kwargs)


def test_bad_tensors() -> None:
    batch = make_batch()
    with pytest.raises(TypeError, match="bfloat16"):
        preference_loss(batch.policy.bfloat16(), batch.ref.bfloat16(), batch.mask)
    with pytest.raises(TypeError, match="ref_logps.*float64"):
        preference_loss(batch.policy, batch.ref.double(), batch.mask)
    with pytest.raises(ValueError, match=r"\[2B, T\]"):
        preference_loss(batch.policy[:3], batch.ref[:3], batch.mask[:3])
    with pytest.raises(ValueError, match=r"\[2B, T\]"):
        preference_loss(batch.policy[0], batch.ref[0], batch.mask[0])
    with pytest.raises(ValueError, match="ref_logps has shape"):
        preference_loss(batch.policy, batch.ref[:, :-1], batch.mask)
    with pytest.raises(ValueError, match="guide_logps has shape"):
        preference_loss(batch.policy, batch.ref, batch.mask, guide_logps=batch.guide[:2])
    with pytest.raises(ValueError, match="loss_mask has shape"):
        preference_loss(batch.policy, batch.ref, batch.mask[:, :-1])
    with pytest.raises(ValueError, match="needs ref_logps"):
        preference_loss(batch.policy, None, batch.mask, loss_type="dpo")
    with pytest.raises(TypeError, match="torch.Tensor"):
        preference_loss(batch.policy.tolist(), batch.ref, batch.mask)
    with pytest.raises(TypeError, match="ref_logps.*float64"):
        tgdpo_token_weights(batch.guide, batch.ref.double(), batch.mask, beta=0.1, alpha=0.5)


def test_simpo_ignores_ref_logps() -> None:
    batch = make_batch(15)
    with_ref = run_loss(batch, loss_type="simpo", beta=2.0)
    without_ref = run_loss(batch, loss_type="simpo", beta=2.0, with_ref=False)
    assert_same_run(with_ref, without_ref, ignore_weight_metrics=False)
    assert math.isfinite(float(with_ref[0]))


def test_ties_count_as_not_accurate_and_policy_equal_ref_is_log_2() -> None:
    batch = make_batch(16)
    batch.policy = batch.ref.clone()  # every implicit reward is exactly 0
    loss, _, metrics = run_loss(batch, loss_type="dpo")
    assert float(metrics["rewards/accuracy"]) == 0.0
    assert float(metrics["rewards/margin"]) == 0.0
    assert abs(float(loss) - math.log(2.0)) < 1e-7


@pytest.mark.parametrize("loss_type", ["dpo", "tgdpo", "ipo", "simpo"])
def test_empty_response_is_finite(loss_type: str) -> None:
    """Documented: an empty response contributes a zero sum / zero mean instead of nan."""
    batch = make_batch(17)
    batch.mask = batch.mask.clone()
    batch.mask[NUM_PAIRS] = 0  # the first rejected response has no tokens
    loss, grad, metrics = run_loss(batch, loss_type=loss_type, beta=0.5)
    assert math.isfinite(float(loss)) and torch.isfinite(grad).all()
    assert all(math.isfinite(float(value)) for value in metrics.values())
    assert torch.all(grad[NUM_PAIRS] == 0)
