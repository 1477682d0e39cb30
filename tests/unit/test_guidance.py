"""The token-guidance plug-ins: every weight function against a float64 hand computation, the shuffled
control is a permutation within each response that never crosses the mask, the constant control, the
score-file source and its errors, and that plug-in weights give the loss TGDPO computes itself."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.guidance import (ResponseLayout, WeightSettings, make_guidance_source, make_weight_function,
                                     shuffle_within_responses)
from megatron_tgdpo.guidance.score_file import ScoreFileError, read_score_file, scores_tensor
from megatron_tgdpo.losses import preference_loss

# Two pairs, rows layout: rows 0-1 chosen, 2-3 rejected; response tokens where MASK is 1.
MASK = torch.tensor([[0, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 1],
                     [0, 1, 1, 0, 0, 0],
                     [0, 1, 1, 1, 1, 0]], dtype=torch.float32)
SAMPLES = torch.tensor([7, 3])


def _rows_batch(mask: torch.Tensor = MASK, samples: torch.Tensor = SAMPLES) -> Batch:
    ids = torch.zeros(mask.shape, dtype=torch.long)
    return Batch.from_rows({"input_ids": ids, "loss_mask": mask, "sample_idx": samples}, num_pairs=len(samples))


def _packed_batch(mask: torch.Tensor = MASK, samples: torch.Tensor = SAMPLES) -> tuple[Batch, torch.Tensor]:
    """The same sequences packed into one row (each sequence's own length), and the map row -> packed."""
    lengths = [int(row.nonzero().max()) + 1 for row in mask]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed_mask = torch.cat([row[:n] for row, n in zip(mask, lengths)]).unsqueeze(0)
    batch = Batch.from_packed({"input_ids": torch.zeros(1, total, dtype=torch.long), "loss_mask": packed_mask,
                               "sequence_ids": seq_ids, "cu_seqlens": cu, "sample_idx": samples},
                              num_pairs=len(samples), num_sequences=2 * len(samples))
    return batch, torch.tensor(lengths)


def _reward() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(MASK.shape, generator=generator, dtype=torch.float64) * 2.0) * MASK.double()


def _weights(name: str, reward: torch.Tensor, batch: Batch, **settings) -> torch.Tensor:
    layout = ResponseLayout.of(batch, dtype=reward.dtype)
    return make_weight_function(name, WeightSettings(**settings))(reward, layout).weights


def _sign(rows: int) -> list[float]:
    return [1.0] * (rows // 2) + [-1.0] * (rows // 2)


def _hand(function) -> torch.Tensor:
    """float64, token by token, from the definitions in guidance/weights.py."""
    reward, out = _reward().tolist(), torch.zeros(MASK.shape, dtype=torch.float64)
    for i, sign in enumerate(_sign(MASK.shape[0])):
        for t in range(MASK.shape[1]):
            if MASK[i, t]:
                out[i, t] = function(sign, reward[i][t])
    return out


@pytest.mark.parametrize("name,settings,function", [
    ("linear", dict(alpha=0.7), lambda s, r: 1 + 0.7 * s * r),
    ("linear", dict(alpha=0.7, weight_clamp=(0.2, 1.5)), lambda s, r: min(1.5, max(0.2, 1 + 0.7 * s * r))),
    ("clipped", dict(alpha=0.7, bound=0.4), lambda s, r: 1 + min(0.4, max(-0.4, 0.7 * s * r))),
    ("tanh", dict(alpha=0.7, bound=0.4), lambda s, r: 1 + 0.4 * math.tanh(0.7 * s * r / 0.4)),
    ("exp", dict(alpha=0.7), lambda s, r: math.exp(0.7 * s * r)),
    ("exp", dict(alpha=0.7, weight_clamp=(None, 2.0)), lambda s, r: min(2.0, math.exp(0.7 * s * r))),
    ("constant-rejected", dict(alpha=0.7, rejected_weight=1.3), lambda s, r: 1.0 if s > 0 else 1.3),
])
def test_weight_function_matches_hand_computation(name, settings, function):
    got = _weights(name, _reward(), _rows_batch(), **settings)
    torch.testing.assert_close(got, _hand(function), rtol=0, atol=1e-12)


def test_normalised_weights_average_one_per_response():
    reward = _reward() * 0.1  # every response's linear weights average above 0
    got = _weights("normalised", reward, _rows_batch(), alpha=0.7)
    linear = _hand(lambda s, r: 1 + 0.7 * s * r * 0.1)
    means = linear.sum(1) / MASK.double().sum(1)
    torch.testing.assert_close(got, linear / means[:, None] * MASK.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.sum(1) / MASK.double().sum(1), torch.ones(4, dtype=torch.float64))
    # a response whose linear weights do not average above 0 keeps weight 1 on every token
    flat = torch.zeros_like(reward)
    flat[2] = MASK[2].double() * 10.0  # rejected row: 1 - 0.7 * 10 < 0 everywhere
    got = _weights("normalised", flat, _rows_batch(), alpha=0.7)
    torch.testing.assert_close(got[2], MASK[2].double())


def _per_response(weights: torch.Tensor) -> list[list[float]]:
    return [sorted(row[MASK[i] > 0].tolist()) for i, row in enumerate(weights)]


def test_shuffled_is_a_permutation_within_each_response_that_never_crosses_the_mask():
    reward, batch = _reward(), _rows_batch()
    linear = _weights("linear", reward, batch, alpha=0.7)
    shuffled = _weights("shuffled", reward, batch, alpha=0.7, seed=5)
    assert _per_response(shuffled) == _per_response(linear)  # same multiset in every response
    assert torch.equal(shuffled[MASK == 0], torch.zeros(int((MASK == 0).sum()), dtype=torch.float64))
    assert not torch.equal(shuffled, linear)
    # deterministic for a seed; another seed gives another permutation
    assert torch.equal(shuffled, _weights("shuffled", reward, batch, alpha=0.7, seed=5))
    assert not torch.equal(shuffled, _weights("shuffled", reward, batch, alpha=0.7, seed=6))


def test_shuffle_depends_on_the_pair_not_on_the_layout_or_batch_position():
    values = torch.arange(1, MASK.numel() + 1, dtype=torch.float64).reshape(MASK.shape) * MASK.double()
    rows = _rows_batch()
    got = shuffle_within_responses(values, ResponseLayout.of(rows, dtype=torch.float64), seed=3)
    packed, lengths = _packed_batch()
    flat = torch.cat([row[:n] for row, n in zip(values, lengths)]).unsqueeze(0)
    got_packed = shuffle_within_responses(flat, ResponseLayout.of(packed, dtype=torch.float64), seed=3)
    assert torch.equal(got_packed, torch.cat([row[:n] for row, n in zip(got, lengths)]).unsqueeze(0))
    # the pairs in the other order: each pair's responses are permuted the same way
    swapped = _rows_batch(MASK[[1, 0, 3, 2]], SAMPLES[[1, 0]])
    got_swapped = shuffle_within_responses(values[[1, 0, 3, 2]], ResponseLayout.of(swapped, dtype=torch.float64), seed=3)
    assert torch.equal(got_swapped, got[[1, 0, 3, 2]])


def test_a_long_response_is_really_shuffled():
    mask = torch.ones(2, 64)
    values = torch.arange(128, dtype=torch.float64).reshape(2, 64)
    got = shuffle_within_responses(values, ResponseLayout.of(_rows_batch(mask, SAMPLES[:1]), dtype=torch.float64), seed=1)
    assert sorted(got[0].tolist()) == values[0].tolist() and sorted(got[1].tolist()) == values[1].tolist()
    assert (got != values).float().mean() > 0.9  # a few fixed points at most


def test_plugin_weights_give_the_loss_tgdpo_computes_from_guide_logps():
    generator = torch.Generator().manual_seed(1)
    policy, ref, guide = (torch.randn(MASK.shape, generator=generator) for _ in range(3))
    batch = _rows_batch()
    layout = ResponseLayout.of(batch)
    source = make_guidance_source("dpo-model", None)
    reward = source.token_rewards(index=0, layout=layout, logps={"reference": ref, "guidance": guide}, beta=0.3)
    weights = make_weight_function("linear", WeightSettings(alpha=0.8, weight_clamp=(0.5, 1.2)))(reward, layout)
    expected = preference_loss(policy, ref, MASK, guide_logps=guide, beta=0.3, alpha=0.8, weight_clamp=(0.5, 1.2))
    got = preference_loss(policy, ref, MASK, beta=0.3, token_weights=weights.weights, clamped_tokens=weights.clamped)
    assert torch.equal(got[0], expected[0])
    assert got[1].keys() == expected[1].keys() and all(torch.equal(got[1][k], expected[1][k]) for k in got[1])
    with pytest.raises(ValueError, match="not both"):
        preference_loss(policy, ref, MASK, guide_logps=guide, token_weights=weights.weights)
    with pytest.raises(ValueError, match="token_weights applies to"):
        preference_loss(policy, ref, MASK, loss_type="dpo", token_weights=weights.weights)


def test_constant_control_mean_rejected_weight_is_the_constant():
    policy = torch.randn(MASK.shape)
    weights = _weights("constant-rejected", torch.zeros(MASK.shape), _rows_batch(), alpha=0.5, rejected_weight=1.1)
    _, metrics = preference_loss(policy, torch.zeros(MASK.shape), MASK, token_weights=weights)
    assert metrics["weights/rejected_mean"].item() == pytest.approx(1.1)
    assert metrics["weights/chosen_mean"].item() == 1.0


def _score_file(tmp_path, lines) -> str:
    path = tmp_path / "scores.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_score_file_scores_land_on_the_response_tokens_in_order(tmp_path):
    lines = [{"index": 7, "chosen": [1, 2, 3], "rejected": [4, 5]},
             {"index": 3, "chosen": [6, 7, 8, 9], "rejected": [10, 11, 12, 13]}]
    path = _score_file(tmp_path, lines)
    got = scores_tensor(read_score_file(path), ResponseLayout.of(_rows_batch()), path=path)
    expected = torch.zeros(MASK.shape)
    for row, values in enumerate([[1, 2, 3], [6, 7, 8, 9], [4, 5], [10, 11, 12, 13]]):
        expected[row, MASK[row] > 0] = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(got, expected)
    packed, lengths = _packed_batch()
    got_packed = scores_tensor(read_score_file(path), ResponseLayout.of(packed), path=path)
    assert torch.equal(got_packed, torch.cat([row[:n] for row, n in zip(expected, lengths)]).unsqueeze(0))
    short = _score_file(tmp_path, [{"index": 7, "chosen": [1, 2], "rejected": [4, 5]}, lines[1]])
    with pytest.raises(ScoreFileError, match=r"chosen: pair 7 has 2 scores, its chosen response 3 trained tokens"):
        scores_tensor(read_score_file(short), ResponseLayout.of(_rows_batch()), path=short)
    missing = _score_file(tmp_path, lines[:1])
    with pytest.raises(ScoreFileError, match="no line for pair 3"):
        scores_tensor(read_score_file(missing), ResponseLayout.of(_rows_batch()), path=missing)


@pytest.mark.parametrize("line,message", [
    ("{not json", r":1: not valid JSON"),
    ({"chosen": [1], "rejected": [1]}, r":1: index: expected a pair index"),
    ({"index": 0, "chosen": [1, "x"], "rejected": [1]}, r":1: chosen: item 1 is 'x', not a number"),
    ({"index": 0, "chosen": [1]}, r":1: rejected: missing"),
    ({"index": 0, "chosen": [1], "rejected": [1], "extra": 1}, r":1: extra: unknown field"),
])
def test_score_file_errors_name_file_line_and_field(tmp_path, line, message):
    path = _score_file(tmp_path, [line])
    with pytest.raises(ScoreFileError, match=message):
        read_score_file(path)
    twice = _score_file(tmp_path, [{"index": 0, "chosen": [1], "rejected": [1]}] * 2)
    with pytest.raises(ScoreFileError, match=r":2: index: pair 0 appears twice"):
        read_score_file(twice)


def _flag_problems(*argv: str) -> list[str]:
    """What the configuration check says of a one-rank run with these flags (parse errors included)."""
    from megatron_tgdpo.config import ConfigError, parse_args, validate

    try:
        cfg = parse_args(["--train-iters", "1", *argv])
    except ConfigError as exc:
        return exc.problems
    return validate(cfg, world_size=1, num_heads=4, num_query_groups=4, num_layers=4)


def test_flags_name_what_each_plugin_needs(tmp_path):
    problems = _flag_problems
    assert any("--rejected-weight" in p for p in problems("--token-weight", "constant-rejected"))
    assert not problems("--token-weight", "constant-rejected", "--rejected-weight", "1.1")  # no guidance needed
    assert any("--guidance-scores FILE" in p for p in problems("--guidance-source", "score-file"))
    assert any("--token-weight 'bogus'" in p for p in problems("--token-weight", "bogus", "--guidance-load", "x"))
    assert any("--guidance-source 'bogus'" in p for p in problems("--guidance-source", "bogus"))
    assert any("--token-weight applies to --loss-type tgdpo" in p
               for p in problems("--loss-type", "dpo", "--token-weight", "tanh"))
    assert any("--token-weight-bound 0: out of range" in p for p in problems("--token-weight-bound", "0"))


def test_reward_model_source_flags():
    import megatron_tgdpo.algorithms  # noqa: F401 - registers --guidance-source reward-model

    problems = _flag_problems

    assert any("reward-model needs --guidance-load" in p for p in problems("--guidance-source", "reward-model"))
    assert any("--guidance-scale applies to --guidance-source reward-model only" in p
               for p in problems("--guidance-scale", "2", "--guidance-load", "x"))
    assert any("--guidance-scale applies to --loss-type tgdpo" in p
               for p in problems("--loss-type", "dpo", "--guidance-scale", "2"))
    assert any("--guidance-scale 0" in p and "out of range" in p
               for p in problems("--guidance-source", "reward-model", "--guidance-scale", "0"))
    assert not [p for p in problems("--guidance-source", "reward-model", "--guidance-scale", "2",
                                    "--guidance-load", "x") if "guidance-s" in p]
