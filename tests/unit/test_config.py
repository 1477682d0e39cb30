"""Configuration: YAML + flags precedence, and every impossible combination refused before compute."""
from __future__ import annotations

import pytest

from megatron_tgdpo.config import parse_args, validate


def _problems(argv, *, world=2, heads=4, groups=4, layers=4):
    return validate(parse_args(argv), world_size=world, num_heads=heads, num_query_groups=groups, num_layers=layers)


BASE = ["--train-iters", "5", "--loss-type", "dpo"]


def test_yaml_is_overridden_by_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("tensor-model-parallel-size: 2\nlr: 1.0e-4\nsequence_parallel: true\n")
    cfg = parse_args(["--config", str(cfg_file), "--lr", "3e-4"])
    assert cfg.tensor_model_parallel_size == 2 and cfg.sequence_parallel is True and cfg.lr == 3e-4


def test_yaml_unknown_key_is_named(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("tensor-parallel: 2\n")
    with pytest.raises(SystemExit, match="unknown option 'tensor-parallel'"):
        parse_args(["--config", str(cfg_file)])


def test_boolean_flags_forms():
    assert parse_args(["--sequence-parallel"]).sequence_parallel is True
    assert parse_args(["--sequence-parallel", "false"]).sequence_parallel is False
    assert parse_args(["--no-tensorboard"]).tensorboard is False


def test_valid_configuration_has_no_problems():
    assert _problems(BASE + ["--tensor-model-parallel-size", "2"]) == []


@pytest.mark.parametrize(
    "argv,kwargs,needle",
    [
        (["--tensor-model-parallel-size", "3"], dict(world=3), "must divide the attention heads"),
        (["--global-batch-size", "6", "--micro-batch-size", "2"], dict(world=2), "--global-batch-size 6 must be divisible"),
        (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], dict(world=2),
         "not divisible by TP*PP*CP"),
        (["--context-parallel-size", "2", "--pad-to-multiple-of", "6", "--seq-length", "120"], dict(world=2),
         "--pad-to-multiple-of 6 must be divisible by 2 x --context-parallel-size"),
        (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "4"], dict(world=2),
         "must divide the 4 layers"),
        (["--sequence-parallel"], dict(world=2), "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--ref-load", "/nonexistent/ckpt"], dict(world=2), "--ref-load /nonexistent/ckpt: does not exist"),
        (["--data-path", "/nonexistent/data"], dict(world=2), "--data-path /nonexistent/data: does not exist"),
        (["--seq-length", "100"], dict(world=2), "must be a multiple of the padding multiple 16"),
        (["--save-interval", "10"], dict(world=2), "--save-interval needs --save"),
        (["--min-lr", "1", "--lr", "0.1"], dict(world=2), "--min-lr 1.0 exceeds --lr 0.1"),
    ],
)
def test_impossible_combinations_are_named(argv, kwargs, needle):
    problems = _problems(BASE + argv, **kwargs)
    assert any(needle in p for p in problems), problems


def test_tgdpo_without_guidance_is_refused():
    problems = _problems(["--train-iters", "5", "--loss-type", "tgdpo"])
    assert any("--guidance-load" in p for p in problems)
    assert _problems(["--train-iters", "5", "--loss-type", "tgdpo", "--alpha", "0"]) == []


def test_iters_or_epochs_exactly_one():
    assert any("--train-iters or --train-epochs" in p for p in _problems(["--loss-type", "dpo"]))
    assert any("only one of" in p for p in _problems(BASE + ["--train-epochs", "1"]))


def test_loss_options_that_do_not_apply_are_refused():
    assert any("--weight-clamp" in p for p in _problems(BASE + ["--weight-clamp-min", "0"]))
    assert any("--label-smoothing does not apply" in p for p in
               _problems(["--train-iters", "5", "--loss-type", "ipo", "--label-smoothing", "0.1"]))
