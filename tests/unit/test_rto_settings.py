"""RTO as published: the per-token dense-reward clip, per-token vs per-sequence loss averaging, the
learned reward's normalisation and clip, and the official defaults (clip 0.05, KL coefficient 0.01)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_tgdpo.algorithms.ppo.advantages import learned_sparse_reward
from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.losses.ppo import policy_loss_sums, token_rewards, value_loss_sums

SPANS = [(1, 4), (2, 8), (0, 1), (3, 6)]  # response positions [a, b) of each row
S = 9


def _mask() -> torch.Tensor:
    mask = torch.zeros(len(SPANS), S, dtype=torch.float64)
    for row, (a, b) in enumerate(SPANS):
        mask[row, a:b] = 1
    return mask


def test_dense_reward_is_clipped_per_token_by_hand():
    gen = torch.Generator().manual_seed(4)
    mask = _mask()
    policy, ref, dpo = (-torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    beta, scale, clip, kl_coef = 0.1, 1.5, 0.05, 0.01
    scores = torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    rewards, parts = token_rewards(mask, policy_logps=policy, ref_logps=ref, dpo_logps=dpo, kl_coef=kl_coef,
                                   beta=beta, dense_scale=scale, dense_clip=clip, scores=scores)
    clipped = 0
    for row, (a, b) in enumerate(SPANS):
        for t in range(a, b):
            raw = scale * beta * (dpo[row, t].item() - ref[row, t].item())
            dense = min(max(raw, -clip), clip)
            clipped += dense != raw
            want = dense - kl_coef * (policy[row, t].item() - ref[row, t].item()) + (scores[row].item() if t == b - 1 else 0)
            assert parts["dense"][row, t].item() == pytest.approx(dense, abs=1e-15)
            assert rewards[row, t].item() == pytest.approx(want, abs=1e-12)
    assert 0 < clipped < mask.sum().item()  # both sides of the clip are exercised
    unclipped, parts = token_rewards(mask, policy_logps=policy, ref_logps=ref, dpo_logps=dpo, kl_coef=kl_coef, beta=beta,
                                     dense_scale=scale, dense_clip=0.0)
    assert torch.allclose(parts["dense"], scale * beta * (dpo - ref) * mask)  # 0: no clip


def _per_token_policy(logps, old, adv, eps):
    ratio = torch.exp(logps - old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))


@pytest.mark.parametrize("averaging", ["token", "sequence"])
def test_loss_averaging_matches_float64_reference_over_micro_batches(averaging):
    gen = torch.Generator().manual_seed(7)
    mask = _mask()
    logps, old = (-torch.rand(mask.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    adv, values, old_values, returns = (torch.randn(mask.shape, generator=gen, dtype=torch.float64) for _ in range(4))
    # float64 reference: every token of the mini-batch at once, or each response's mean then their mean
    pol = _per_token_policy(logps, old, adv, 0.2)
    val = 0.5 * torch.maximum((values - returns) ** 2,
                              (old_values + (values - old_values).clamp(-0.3, 0.3) - returns) ** 2)
    rows = [(a, b) for a, b in SPANS]
    if averaging == "token":
        want_pol = sum(pol[r, a:b].sum().item() for r, (a, b) in enumerate(rows)) / mask.sum().item()
        want_val = sum(val[r, a:b].sum().item() for r, (a, b) in enumerate(rows)) / mask.sum().item()
    else:
        want_pol = sum(pol[r, a:b].mean().item() for r, (a, b) in enumerate(rows)) / len(rows)
        want_val = sum(val[r, a:b].mean().item() for r, (a, b) in enumerate(rows)) / len(rows)
    # the trainer's form: numerators and counts summed over micro-batches of unequal token counts
    num_p = cnt_p = num_v = cnt_v = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        p, c, _ = policy_loss_sums(logps[part], old[part], adv[part], mask[part], clip_range=0.2, averaging=averaging)
        v, d, _ = value_loss_sums(values[part], old_values[part], returns[part], mask[part], clip_range=0.3,
                                  averaging=averaging)
        num_p, cnt_p, num_v, cnt_v = num_p + p.item(), cnt_p + c.item(), num_v + v.item(), cnt_v + d.item()
    assert cnt_p == cnt_v == (mask.sum().item() if averaging == "token" else len(rows))
    assert num_p / cnt_p == pytest.approx(want_pol, rel=1e-12)
    assert num_v / cnt_v == pytest.approx(want_val, rel=1e-12)


def test_sequence_averaging_gives_each_response_the_same_weight_in_the_gradient():
    mask = torch.zeros(2, 6, dtype=torch.float64)
    mask[0, 0:1], mask[1, 0:5] = 1, 1  # a 1-token and a 5-token response
    logps = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    adv = torch.ones(2, 6, dtype=torch.float64)
    loss, count, _ = policy_loss_sums(logps, torch.zeros(2, 6, dtype=torch.float64), adv, mask, clip_range=0.2,
                                      averaging="sequence")
    (loss / count).backward()
    # d/dlogp of -A * ratio at ratio 1 is -A; each row's tokens share 1/2 of the weight
    assert logps.grad[0, 0].item() == pytest.approx(-0.5)
    assert logps.grad[1, :5].tolist() == pytest.approx([-0.1] * 5)


def test_learned_reward_is_normalised_then_clipped_by_hand():
    ppo = PPOConfig(prompts="p", learned_reward_mean=1.0, learned_reward_std=0.5, learned_reward_clip=3.0)
    raw = torch.tensor([1.0, 2.0, -1.0, 4.0], dtype=torch.float64)
    assert learned_sparse_reward(raw, ppo=ppo).tolist() == [0.0, 2.0, -3.0, 3.0]  # -4 and 6 clipped
    loose = PPOConfig(prompts="p", learned_reward_mean=1.0, learned_reward_std=0.5, learned_reward_clip=0.0)
    assert learned_sparse_reward(raw, ppo=loose).tolist() == [0.0, 2.0, -4.0, 6.0]


def test_official_defaults_kl_coef_and_dense_clip(tmp_path):
    from megatron_tgdpo.ppo.cli import parse

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "0", "prompt": "1+1=", "task": "addition", "answer": "2"}) + "\n")
    ppo, _ = parse(["--prompts", str(prompts), "--reward", "sparse", "--train-iters", "1"])
    assert ppo.kl_coef == 0.01 and ppo.dense_reward_clip == 0.05 and ppo.ppo_loss_averaging == "token"
    assert ppo.learned_reward_load is None and ppo.learned_reward_clip == 10.0


def test_misplaced_reward_model_flags_are_refused_by_name(tmp_path):
    from megatron_tgdpo.config import ConfigError, parse_args, validate
    from megatron_tgdpo.ppo.cli import parse

    def problems(*argv: str) -> list[str]:
        cfg = parse_args(["--train-iters", "1", "--seq-length", "64", *argv])
        return validate(cfg, world_size=2, num_heads=4, num_query_groups=2, num_layers=4)

    assert "--rm-margin applies to --loss-type rm only" in problems("--loss-type", "dpo", "--rm-margin", "0.5")
    assert "--guidance-load does not apply to --loss-type rm" in problems("--loss-type", "rm", "--guidance-load",
                                                                         str(tmp_path))
    assert any(line.startswith("--context-parallel-size 2: --loss-type rm")
               for line in problems("--loss-type", "rm", "--context-parallel-size", "2"))
    assert problems("--loss-type", "rm", "--rm-margin", "0.5") == []
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "0", "prompt": "1+1=", "task": "addition", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError) as err:
        parse(["--prompts", str(prompts), "--reward", "dense-dpo", "--reward-model-load", str(tmp_path),
               "--learned-reward-load", str(tmp_path / "missing"), "--train-iters", "1"])
    text = str(err.value)
    assert "--learned-reward-load is the sparse reward; it does not apply to --reward dense-dpo" in text
    assert f"--learned-reward-load {tmp_path / 'missing'}: does not exist" in text


def test_comparison_fingerprints_the_tokenizer_by_content(tmp_path):
    """A comparison resumed from another checkout or install (the built-in tokenizer at another path)
    reruns nothing; an edited tokenizer file at the same path is a different tokenizer."""
    import shutil

    from megatron_tgdpo.ppo.compare import Comparison, _builtin_tokenizer, build_parser

    def recorded(*flags: str) -> str:
        return Comparison(build_parser().parse_args(["--output", str(tmp_path / "out"), *flags]),
                          tmp_path / "out").tokenizer_hash

    copy = tmp_path / "elsewhere" / "tokenizer.model"
    copy.parent.mkdir()
    shutil.copyfile(_builtin_tokenizer(), copy)
    builtin = recorded()
    assert recorded("--tokenizer", str(copy)) == builtin
    assert str(tmp_path) not in builtin
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert recorded("--tokenizer", str(copy)) != builtin
