"""The configuration's sections: one builder for flags and YAML, flat or sectioned YAML, and a flag of
another method's section refused by name."""
from __future__ import annotations

import json

import pytest

from megatron_tgdpo.config import ConfigError, PreferenceConfig, parse_args

BASE = ["--train-iters", "5"]


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_preference_settings_live_in_their_section_and_read_flat():
    cfg = parse_args(BASE + ["--alpha", "0.25", "--weight-clamp-max", "2", "--simpo-gamma", "1"])
    assert cfg.preference == PreferenceConfig(alpha=0.25, weight_clamp_max=2.0, simpo_gamma=1.0)
    assert (cfg.alpha, cfg.weight_clamp()) == (0.25, (None, 2.0))  # flat names read the section
    assert "alpha" not in cfg.to_dict() and cfg.to_dict()["preference"]["alpha"] == 0.25


def test_yaml_takes_a_section_or_flat_names_and_flags_override_it(tmp_path):
    sectioned = parse_args(["--config", _yaml(tmp_path, "train-iters: 5\npreference:\n  alpha: 2\n  weight-clamp-min: 0\n")])
    flat = parse_args(["--config", _yaml(tmp_path, "train_iters: 5\nalpha: 2\nweight_clamp_min: 0\n")])
    flags = parse_args(BASE + ["--alpha", "2", "--weight-clamp-min", "0"])
    assert sectioned == flat == flags
    assert isinstance(sectioned.alpha, float) and sectioned.alpha == 2.0  # YAML's int made a float
    assert parse_args(["--config", _yaml(tmp_path, "preference: {alpha: 2}\ntrain_iters: 5\n"), "--alpha", "3"]).alpha == 3.0


def test_yaml_problems_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'alpah' in preference"):
        parse_args(["--config", _yaml(tmp_path, "preference: {alpah: 2}\n")])
    with pytest.raises(ConfigError, match=r"--alpha: expected float, got 'x'"):
        parse_args(["--config", _yaml(tmp_path, "preference: {alpha: x}\ntrain_iters: 5\n")])


def _ppo_argv(tmp_path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"{i}+1=", "task": "addition", "answer": str(i + 1)})
                               + "\n" for i in range(10)))
    return ["--prompts", str(prompts), "--reward", "sparse", "--train-iters", "2", *extra]


def test_ppo_reads_its_section_and_refuses_preference_flags_by_name(tmp_path):
    from megatron_tgdpo.ppo.cli import parse

    ppo, cfg = parse(_ppo_argv(tmp_path, "--kl-coef", "0.1", "--no-whiten-advantages"))
    assert cfg.ppo is ppo and ppo.kl_coef == 0.1 and ppo.whiten_advantages is False and cfg.loss_type == "ppo"
    ppo, cfg = parse(_ppo_argv(tmp_path, "--config", _yaml(tmp_path, "lr: 0.001\nppo: {kl_coef: 0.2, ppo_epochs: 3}\n")))
    assert (ppo.kl_coef, ppo.ppo_epochs, cfg.lr) == (0.2, 3, 0.001)
    with pytest.raises(ConfigError) as err:
        parse(_ppo_argv(tmp_path, "--alpha", "1", "--weight-clamp-max=2", "--logprob-cache", "c", "--loss-type", "dpo"))
    text = str(err.value)
    for flag in ("--alpha", "--weight-clamp-max", "--logprob-cache", "--loss-type"):
        assert f"{flag} does not apply to PPO" in text, flag
    with pytest.raises(ConfigError, match="the 'preference' section does not apply to PPO"):
        parse(_ppo_argv(tmp_path, "--config", _yaml(tmp_path, "preference: {alpha: 1}\n")))
    with pytest.raises(ConfigError, match="'alpha' does not apply to PPO"):
        parse(_ppo_argv(tmp_path, "--config", _yaml(tmp_path, "alpha: 1\n")))
    # and the training command does not know PPO's flags
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--kl-coef", "0.1"])


def test_ppo_iterations_come_from_the_prompt_file(tmp_path):
    from megatron_tgdpo.algorithms.ppo.algorithm import PPOAlgorithm
    from megatron_tgdpo.ppo.cli import parse

    argv = _ppo_argv(tmp_path)
    argv[argv.index("--train-iters"):argv.index("--train-iters") + 2] = ["--train-epochs", "1.5"]
    _, cfg = parse(argv + ["--global-batch-size", "4", "--micro-batch-size", "2", "--samples-per-prompt", "1",
                           "--ppo-mini-batches", "1"])
    assert cfg.train_iters is None  # not rewritten: the algorithm says how many iterations its data gives
    assert PPOAlgorithm.iterations(cfg, data=None) == 4  # ceil(1.5 x 10 prompts / 4 per iteration)
