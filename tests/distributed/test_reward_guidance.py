"""``--guidance-source reward-model``: TGDPO's per-token reward from a Bradley–Terry reward model's values.

The reference here runs the saved reward model on each sequence alone (one row, no padding, no packing)
and takes, in float64, ``r̂_t = scale * (V[P + t] - V[P + t - 1])`` for response token ``t`` of a prompt of
``P`` tokens (``V[i]``: the value head's output at position ``i``). The plug-in, asked through its public
interface on the trainer's micro-batches (packed rows, padded rows, shared prompts), gives those numbers;
a TGDPO run guided by the checkpoint logs, at step 1, the global token means of ``1 + alpha * r̂`` on chosen
and ``1 - alpha * r̂`` on rejected tokens of that step's pairs, on one rank and at TP=2 and PP=2."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_tgdpo.testing import RankFailure, read_metrics, run_on_ranks, run_train

SEED, GLOBAL_BATCH, SEQ = 3, 4, 64
SCALE, ALPHA = 30.0, 1.0  # large: a one-step reward model's values differ little, the weights must spread


def _common(tmp: Path, name: str) -> list[str]:
    return ["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH),
            "--seq-length", str(SEQ), "--seed", str(SEED), "--data-cache-dir", str(tmp / "data"),
            "--log-dir", str(tmp / name), "--eval-iters", "0", "--no-tensorboard"]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rmguide")
    argv = _common(tmp, "rm") + ["--loss-type", "rm", "--train-iters", "1", "--lr", "1e-3", "--save", str(tmp / "rm")]
    assert run_on_ranks(1, run_train, argv, model_parallel=False) == [0]
    return tmp


def _config(data_dir: str, ckpt: str, **overrides):
    from megatron_tgdpo.config import TrainConfig

    cfg = TrainConfig(data_cache_dir=data_dir, train_iters=1, micro_batch_size=2, global_batch_size=GLOBAL_BATCH,
                      seq_length=SEQ, seed=SEED, loss_type="tgdpo", **overrides)
    cfg.preference.guidance_source = "reward-model"
    cfg.preference.guidance_load = ckpt
    cfg.preference.guidance_scale = SCALE
    cfg.preference.alpha = ALPHA
    return cfg


def _hand_rewards(cfg, arch, prefix: str, keys) -> dict:
    """(pair index, side) -> float64 r̂ per response token, from the reward model run on each sequence alone."""
    import torch

    from megatron_tgdpo.algorithms.reward_model import build_reward_model
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.models.value_head import value_output

    (model,) = build_reward_model(arch, cfg, load=cfg.preference.guidance_load, seed=12345)  # the head: from file
    model.eval()
    dataset = PreferenceDataset(prefix)
    out = {}
    for index, side in keys:
        pair = dataset[index]
        prompt, response = list(pair["prompt"]), list(pair["rejected" if side else "chosen"])
        ids = torch.tensor([prompt + response], dtype=torch.long)
        with torch.no_grad():
            values = value_output(model, model(ids, torch.arange(ids.shape[1])[None], attention_mask=None))
        values = values[0].double()
        p = len(prompt)
        out[(index, side)] = [SCALE * float(values[p + t] - values[p + t - 1]) for t in range(len(response))]
    return out


def _plugin_against_hand(data_dir: str, ckpt: str) -> dict:
    """The plug-in's r̂ per sequence in three batch layouts, and the hand computation of the same pairs."""
    from megatron_tgdpo.algorithms.reward_guidance import RewardModelSource
    from megatron_tgdpo.guidance import ResponseLayout, make_guidance_source
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource

    layouts = {"packed": dict(pack_sequences=True), "rows": dict(pack_sequences=False),
               "shared-prompt": dict(pack_sequences=True, share_prompt=True)}
    plugin, arch, prefix = {}, None, None
    for name, flags in layouts.items():
        cfg = _config(data_dir, ckpt, **flags)
        data = setup.resolve_data(cfg)
        arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
        prefix = data.train_prefix
        source = make_guidance_source("reward-model", cfg.preference)
        assert isinstance(source, RewardModelSource) and source.problems(cfg.preference) == []
        source.setup(cfg=cfg, arch=arch)
        batches = BatchSource(cfg, prefix, data.pad_id, consumed_samples=0, shuffle=True).next_global_batch()
        source.begin_step(batches)
        got = {}
        for index, batch in enumerate(batches):
            layout = ResponseLayout.of(batch)
            reward = source.token_rewards(index=index, layout=layout, logps={}, beta=0.1)
            assert bool((reward[~layout.response] == 0).all())
            ids, response = layout.full_sequence_ids(), layout.full_response()
            samples, sides = layout.sequence_samples()
            for sequence, key in enumerate(zip(samples.tolist(), sides.tolist())):
                got[key] = reward[response & (ids == sequence)].double().tolist()
        plugin[name] = got
    keys = sorted(plugin["packed"])
    hand = _hand_rewards(_config(data_dir, ckpt), arch, prefix, keys)
    return {"plugin": {name: {k: got[k] for k in keys} for name, got in plugin.items()},
            "hand": {k: hand[k] for k in keys}}


@pytest.fixture(scope="module")
def scored(reward_model):
    tmp = reward_model
    (out,) = run_on_ranks(1, _plugin_against_hand, str(tmp / "data"), str(tmp / "rm"))
    return out


def test_token_rewards_are_value_differences_in_every_batch_layout(scored):
    hand = scored["hand"]
    assert len(hand) == 2 * GLOBAL_BATCH
    assert max(abs(x) for values in hand.values() for x in values) > 0.05  # a test that can fail
    for name, got in scored["plugin"].items():
        assert set(got) == set(hand), name
        for key, values in hand.items():
            assert len(got[key]) == len(values), f"{name} {key}: {len(got[key])} tokens vs {len(values)}"
            assert got[key] == pytest.approx(values, rel=1e-4, abs=1e-4 * SCALE), f"{name} {key}"


@pytest.fixture(scope="module")
def expected(scored):
    """Step 1's weight metrics from the hand r̂ of its global batch: the pairs scored above are the first
    global batch of the training stream (consumed samples 0, the run's seed, one data-parallel rank)."""
    hand = scored["hand"]
    chosen = [1 + ALPHA * r for (_, side), values in hand.items() if side == 0 for r in values]
    rejected = [1 - ALPHA * r for (_, side), values in hand.items() if side == 1 for r in values]
    out = {"weights/chosen_mean": sum(chosen) / len(chosen), "weights/rejected_mean": sum(rejected) / len(rejected),
           "weights/negative_fraction": sum(w < 0 for w in chosen + rejected) / len(chosen + rejected)}
    assert abs(out["weights/chosen_mean"] - 1) > 1e-3 and abs(out["weights/rejected_mean"] - 1) > 1e-3
    return out


def _tgdpo(tmp: Path, name: str, *layout: str) -> list[str]:
    return _common(tmp, name) + ["--loss-type", "tgdpo", "--train-iters", "2", "--lr", "1e-4",
                                 "--guidance-source", "reward-model", "--guidance-load", str(tmp / "rm"),
                                 "--guidance-scale", str(SCALE), "--alpha", str(ALPHA), *layout]


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["single", "tp2", "pp2"])
def test_tgdpo_guided_by_a_reward_model_logs_the_hand_weights(reward_model, expected, layout):
    tmp = reward_model
    name = (layout[0].strip("-") if layout else "single")
    ranks = 2 if layout else 1
    assert run_on_ranks(ranks, run_train, _tgdpo(tmp, name, *layout), model_parallel=False) == [0] * ranks
    rows = read_metrics(tmp / name)
    assert [r["iteration"] for r in rows] == [1, 2]
    for key, value in expected.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} step 1 {key}"


def _problems(data_dir: str, not_rm: str) -> dict:
    from megatron_tgdpo.algorithms.reward_guidance import RewardModelSource

    section = _config(data_dir, not_rm).preference
    missing = _config(data_dir, not_rm).preference
    missing.guidance_load = None
    return {"wrong": RewardModelSource.problems(section), "missing": RewardModelSource.problems(missing)}


def test_refuses_what_is_not_a_reward_model_and_context_parallelism(reward_model):
    import torch

    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.models.llama import preset

    tmp = reward_model
    not_rm = write_synthetic_hf(tmp / "causal-lm", preset("tiny"), dtype=torch.float32, seed=5)
    (out,) = run_on_ranks(1, _problems, str(tmp / "data"), str(not_rm), model_parallel=False)
    assert len(out["wrong"]) == 1 and "not a reward model checkpoint" in out["wrong"][0]
    assert len(out["missing"]) == 1 and "needs --guidance-load" in out["missing"][0]
    wrong = [str(not_rm) if flag == str(tmp / "rm") else flag for flag in _tgdpo(tmp, "wrong")]
    with pytest.raises(RankFailure, match="(?s)ConfigError: .*not a reward model checkpoint"):
        run_on_ranks(1, run_train, wrong, model_parallel=False)  # the command prints the line and exits 2
    cp = _tgdpo(tmp, "cp2", "--context-parallel-size", "2")
    with pytest.raises(RankFailure, match="ConfigError: --guidance-source reward-model does not work with "
                                          "--context-parallel-size 2"):
        run_on_ranks(2, run_train, cp, model_parallel=False)


def test_language_model_flags_refuse_a_reward_model_checkpoint(reward_model):
    """A reward model's checkpoint has a value head where a language model has its output layer: as
    --ref-load, or as --guidance-load of DPO-model guidance (training or the log-prob cache tool), it is
    refused by name before anything is built."""
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.runtime.path_checks import config_problems

    rm = str(reward_model / "rm")
    plain = dict(data_cache_dir=str(reward_model / "data"), train_iters=1, micro_batch_size=2,
                 global_batch_size=GLOBAL_BATCH, seq_length=SEQ, seed=SEED, loss_type="tgdpo")
    as_guidance = TrainConfig(**plain)
    as_guidance.preference.guidance_load = rm
    (line,) = [p for p in config_problems(as_guidance) if "reward model" in p]
    assert line.startswith(f"--guidance-load {rm}: a reward model checkpoint") and "--guidance-source reward-model" in line
    guided = TrainConfig(**plain)  # the same checkpoint through the reward-model source is fine here
    guided.preference.guidance_source, guided.preference.guidance_load = "reward-model", rm
    assert not [p for p in config_problems(guided) if "reward model" in p]
    as_reference = TrainConfig(**{**plain, "loss_type": "dpo"}, ref_load=rm)
    assert [p for p in config_problems(as_reference) if "reward model" in p] == [
        f"--ref-load {rm}: a reward model checkpoint (saved by --loss-type rm), not a language model; --ref-load "
        "takes the reference policy (the model training starts from)"]
    # The log-prob cache tool checks its configuration the same way (on a rank: it sizes the data layout).
    (refusal,) = run_on_ranks(1, _scoring_refusal, as_guidance, model_parallel=False)
    assert refusal.startswith(f"--guidance-load {rm}: a reward model checkpoint"), refusal


def _scoring_refusal(cfg) -> str:
    from megatron_tgdpo.precompute import ToolError, scoring_config

    try:
        scoring_config(cfg, 1)
    except ToolError as exc:
        line = next(line for line in str(exc).splitlines() if "reward model" in line).strip()
        return line[2:] if line.startswith("- ") else line  # one problem of a list
    return "accepted"
