"""Bad flags through the real command lines (``python -m megatron_tgdpo.train`` / ``megatron_tgdpo.ppo``):
exit 2, every bad flag named, no traceback, no hang (at most 20 s of CPU per case).

Every numeric flag goes bad in the same invocation (non-finite, negative, huge, 2**70), so a handful of
processes covers them all; each value of each flag is also tried alone, in-process, by
tests/unit/test_flag_checks.py. Range errors are found while parsing, before the process group and
the model libraries, so those cases take seconds. Path flags of the wrong kind are judged once the
process group exists (the model flags need megatron's checkpoint code): those cases are slower and
marked ``slow``.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.testing import free_port

from suite import side_by_side

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_flag_checks import PPO_FLAGS, TRAIN_FLAGS  # noqa: E402 - the flags, read from the dataclasses
from test_path_checks import wrong_kinds  # noqa: E402

#: Each case may use 20 s of CPU (a process that computes instead of refusing is killed by the kernel,
#: and its exit status is then not 2) and gets a wall-clock timeout for a process that blocks instead:
#: the CPU limit is what a case costs, the wall-clock one leaves room for a machine shared with other work.
CPU_LIMIT_S = 20
FAST_TIMEOUT_S = 90  # a case that parses flags only (a few seconds on an idle machine)
SLOW_TIMEOUT_S = 180  # one that builds the process group and imports megatron first


def _limit_cpu() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))


def _run(module: str, argv: list[str], *, timeout: int = FAST_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True, preexec_fn=_limit_cpu)


def _assert_refused(result: subprocess.CompletedProcess, flags: list[str]) -> None:
    err = result.stderr
    assert result.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    unnamed = [flag for flag in flags if f"{flag} " not in err and f"{flag}:" not in err]
    assert not unnamed, (unnamed, err[-3000:])


# (float value, integer value) sets: every numeric flag of the command gets one of them at once
VALUE_SETS = {
    "nan/2**70": ("nan", str(2**70)),
    "-inf/negative": ("-inf", "-1"),
    "inf/huge": ("inf", str(10**12)),
    "1e308/-2**70": ("1e308", str(-(2**70))),
}


def _all_bad(flags: dict[str, type], values: tuple[str, str]) -> list[str]:
    argv = []
    for flag, typ in sorted(flags.items()):
        value = values[1] if typ is int else values[0]
        argv.append(f"{flag}={value}")
    return argv


FRACTIONS = [("megatron_tgdpo.train", "--micro-batch-size"), ("megatron_tgdpo.ppo", "--samples-per-prompt")]


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """The cases that parse flags only, by name: independent processes of a few seconds each, run side by
    side (each still under its own CPU limit and timeout)."""
    tmp = tmp_path_factory.mktemp("flag_fuzz")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    base = ["--prompts", str(prompts), "--reward", "sparse", "--train-iters", "1"]
    cases: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for values in sorted(VALUE_SETS):
        cases["train", values] = ("megatron_tgdpo.train", _all_bad(TRAIN_FLAGS, VALUE_SETS[values]))
        cases["ppo", values] = ("megatron_tgdpo.ppo", base + _all_bad(PPO_FLAGS, VALUE_SETS[values]))
        # The trainer's flags are PPO's too, checked the same way.
        cases["ppo-train-flags", values] = ("megatron_tgdpo.ppo", base[:4] + _all_bad(TRAIN_FLAGS, VALUE_SETS[values]))
    for module, flag in FRACTIONS:
        cases["fraction", module, flag] = (module, [flag, "1e9"])
    kinds = wrong_kinds(tmp / "kinds")
    cases["ppo-model-flags"] = ("megatron_tgdpo.ppo", ["--prompts", str(prompts), "--train-iters", "1",
                                                        "--reward-model-load", str(kinds["file"]),
                                                        "--critic-load", str(kinds["random"])])
    done = side_by_side(*(lambda module=module, argv=argv: _run(module, argv) for module, argv in cases.values()))
    return dict(zip(cases, done))


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_trainer_refuses_every_bad_number_at_once(fast_runs, values):
    _assert_refused(fast_runs["train", values], sorted(TRAIN_FLAGS))


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_ppo_refuses_every_bad_number_at_once(fast_runs, values):
    _assert_refused(fast_runs["ppo", values], sorted(PPO_FLAGS))
    # The trainer's flags are PPO's too, checked the same way.
    _assert_refused(fast_runs["ppo-train-flags", values], sorted(TRAIN_FLAGS))


@pytest.mark.parametrize("module,flag", FRACTIONS)
def test_a_fraction_for_a_count_is_one_line(fast_runs, module, flag):
    result = fast_runs["fraction", module, flag]
    _assert_refused(result, [flag])
    assert result.stderr.count("\n") == 1, result.stderr  # not the whole usage


@pytest.mark.slow
def test_trainer_path_flags_of_the_wrong_kind(tmp_path):
    kinds = wrong_kinds(tmp_path / "kinds")
    argv = ["--loss-type", "tgdpo", "--train-iters", "1", "--data-cache-dir", str(tmp_path / "data"),
            "--ref-load", str(kinds["empty"]), "--guidance-load", str(kinds["file"]),
            "--logprob-cache", str(kinds["random"]), "--load", str(kinds["hf_bin"]), "--fp8-format", "hybrid"]
    result = _run("megatron_tgdpo.train", argv, timeout=SLOW_TIMEOUT_S)
    flags = ["--ref-load", "--guidance-load", "--logprob-cache", "--load"]
    if not _has_cuda():
        flags.append("--fp8-format")
    _assert_refused(result, flags)
    assert "expected a checkpoint directory" in result.stderr and "expected a directory made by" in result.stderr
    # The reference as a Hugging Face directory whose only weights are pytorch_model.bin.
    result = _run("megatron_tgdpo.train", argv[:6] + ["--ref-load", str(kinds["hf_bin"]), "--loss-type", "dpo"],
                  timeout=SLOW_TIMEOUT_S)
    _assert_refused(result, ["--ref-load"])
    assert "only PyTorch .bin weights" in result.stderr


@pytest.mark.slow
def test_trainer_data_path_of_random_files(tmp_path):
    prefix = tmp_path / "pairs"
    for suffix in (".bin", ".idx", ".manifest.json"):
        Path(f"{prefix}{suffix}").write_bytes(os.urandom(2048))
    result = _run("megatron_tgdpo.train", ["--loss-type", "dpo", "--train-iters", "1", "--data-path", str(prefix)],
                  timeout=SLOW_TIMEOUT_S)
    _assert_refused(result, ["--data-path"])


def test_ppo_model_flags_of_the_wrong_kind(fast_runs):
    _assert_refused(fast_runs["ppo-model-flags"], ["--reward-model-load", "--critic-load"])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
