"""Every numeric flag of the trainer and PPO has a range, and values outside it are refused when the
flags are parsed, naming the flag (in-process: the command-line half is tests/e2e/test_flag_fuzz.py)."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from megatron_tgdpo import flag_checks
from megatron_tgdpo.algorithms.ppo.config import PPOConfig
from megatron_tgdpo.config import ConfigError, TrainConfig, build_parser, parse_args
from megatron_tgdpo.flag_checks import BOUNDS, Bound


def _numeric_fields(cls: type) -> dict[str, type]:
    """flag -> int or float for every numeric field of a configuration dataclass, sections included
    (a field whose type is itself a dataclass), read from the type hints, not from the table."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            out.update(_numeric_fields(args[0]))
        elif len(args) == 1 and args[0] in (int, float):
            out[flag_checks.flag_name(f.name)] = args[0]
    return out


TRAIN_FLAGS = _numeric_fields(TrainConfig)
PPO_FLAGS = _numeric_fields(PPOConfig)


def test_every_numeric_field_has_a_bound():
    assert len(TRAIN_FLAGS) > 30 and len(PPO_FLAGS) > 10  # the walk found the fields
    missing = sorted((set(TRAIN_FLAGS) | set(PPO_FLAGS)) - set(BOUNDS))
    assert not missing, f"numeric flags without an entry in flag_checks.BOUNDS: {missing}"


def test_every_bound_is_a_flag_with_the_right_kind():
    numeric = {**TRAIN_FLAGS, **PPO_FLAGS}
    assert sorted(set(BOUNDS) - set(numeric)) == []  # no stale entries
    for flag, typ in numeric.items():
        assert BOUNDS[flag].integer == (typ is int), flag
        assert math.isfinite(BOUNDS[flag].low) and math.isfinite(BOUNDS[flag].high), flag


def test_defaults_are_within_their_bounds():
    defaults = {**{flag_checks.flag_name(f.name): f.default for f in dataclasses.fields(TrainConfig)},
                **{flag_checks.flag_name(f.name): f.default for f in dataclasses.fields(PPOConfig)}}
    assert flag_checks.problems(defaults) == []


def _bad_values(bound: Bound) -> list[str]:
    """Values the flag must refuse, as typed on a command line."""
    values = ["nan", "inf", "-inf", "1e308", "-1e308", str(2**70), str(-(2**70))]
    below = bound.low if bound.low_open else bound.low - (1 if bound.integer else 1e-9 * max(1.0, abs(bound.low)))
    above = bound.high if bound.high_open else bound.high + (1 if bound.integer else 1e-9 * max(1.0, abs(bound.high)))
    values += [str(int(below)) if bound.integer else repr(below), str(int(above)) if bound.integer else repr(above)]
    if bound.integer:
        values += ["1.5", "1e9"]
    return values


def _refusal(parse, argv: list[str], capsys) -> str:
    """What ``parse(argv)`` said when it refused; fails when it accepted."""
    with pytest.raises(SystemExit) as info:
        parse(argv)
    if isinstance(info.value, ConfigError):
        return "\n".join(info.value.problems)
    assert info.value.code == 2  # argparse: a value of the wrong type
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err  # one line, not the whole usage
    return err


@pytest.mark.parametrize("flag", sorted(TRAIN_FLAGS))
def test_trainer_refuses_out_of_range_values_naming_the_flag(flag, capsys):
    bound = BOUNDS[flag]
    for value in _bad_values(bound):
        said = _refusal(parse_args, [f"{flag}={value}"], capsys)
        assert flag in said, (value, said)
    # The ends of the range themselves are accepted (where the range includes them).
    for end, is_open in ((bound.low, bound.low_open), (bound.high, bound.high_open)):
        if not is_open:
            text = str(int(end)) if bound.integer else repr(float(end))
            value = getattr(parse_args([f"{flag}={text}"]), flag[2:].replace("-", "_"))
            assert value == end


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo") / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\n')
    return str(path)


@pytest.mark.parametrize("flag", sorted(PPO_FLAGS))
def test_ppo_refuses_out_of_range_values_naming_the_flag(flag, prompts, capsys):
    from megatron_tgdpo.ppo.cli import parse

    base = ["--prompts", prompts, "--reward", "sparse", "--train-iters", "1"]
    for value in _bad_values(BOUNDS[flag]):
        said = _refusal(parse, base + [f"{flag}={value}"], capsys)
        assert flag in said, (value, said)


def test_several_bad_values_are_all_named_in_one_error():
    with pytest.raises(ConfigError) as info:
        parse_args(["--lr", "1e308", "--beta", "nan", "--seed", "-1", "--global-batch-size", "1000000000000",
                    "--train-iters", str(10**23)])
    problems = info.value.problems
    assert len(problems) == 5
    for flag in ("--lr", "--beta", "--seed", "--global-batch-size", "--train-iters"):
        assert sum(p.startswith(flag + " ") for p in problems) == 1, problems


def test_yaml_values_are_checked_like_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_iters: 1.0e+23\nbeta: .inf\n")
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(config)])
    assert any(p.startswith(f"--train-iters {int(1e23)}: out of range") for p in info.value.problems)
    assert any(p.startswith("--beta inf: not a finite number") for p in info.value.problems)
    config.write_text("seed: 2.5\n")
    with pytest.raises(ConfigError, match="--seed: expected int"):
        parse_args(["--config", str(config)])


def test_ppo_range_problems_are_not_repeated_by_its_own_checks(prompts):
    from megatron_tgdpo.ppo.cli import parse

    with pytest.raises(ConfigError) as info:
        parse(["--prompts", prompts, "--reward", "sparse", "--train-iters", "1", "--kl-coef", "inf",
               "--temperature", "-1"])
    named = [p.split(" ", 1)[0] for p in info.value.problems]
    assert named.count("--kl-coef") == 1 and named.count("--temperature") == 1, info.value.problems


def test_help_states_the_range():
    help_text = flag_checks.checked_parser(build_parser()).format_help()
    assert "(expected: an integer in [0, 4294967295])" in " ".join(help_text.split())


def test_bound_reference_cases():
    unit = Bound(0.0, 1.0, high_open=True)
    assert unit.problem("--x", 0.0) is None and unit.problem("--x", 0.999) is None
    assert "out of range" in unit.problem("--x", 1.0) and "out of range" in unit.problem("--x", -0.0001)
    assert "not a finite number" in unit.problem("--x", float("nan"))
    whole = Bound(1, 10, integer=True)
    assert "not a whole number" in whole.problem("--n", 2.5) and whole.problem("--n", 10.0) is None
    assert "expected" in whole.problem("--n", True)  # a bool is no count
    assert whole.problem("--n", None) is None  # an unset optional flag
