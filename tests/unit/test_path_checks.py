"""Path flags of the wrong kind are named with what the flag expects (in-process; the command-line half
is tests/e2e/test_flag_fuzz.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_tgdpo.config import parse_args
from megatron_tgdpo.runtime import path_checks
from megatron_tgdpo.runtime.path_checks import logprob_cache_problem, model_dir_problem


def wrong_kinds(root: Path) -> dict[str, Path]:
    """Paths that are no model, no checkpoint and no cache (shared with the command-line test)."""
    root.mkdir(parents=True, exist_ok=True)
    kinds = {"file": root / "a_file.txt", "empty": root / "empty", "random": root / "random",
             "hf_bin": root / "hf_bin"}
    kinds["file"].write_text("not a model\n")
    kinds["empty"].mkdir(exist_ok=True)
    kinds["random"].mkdir(exist_ok=True)
    for name in ("manifest.json", "weights.bin", "iter_x"):
        (kinds["random"] / name).write_bytes(os.urandom(4096))
    kinds["hf_bin"].mkdir(exist_ok=True)
    (kinds["hf_bin"] / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
        '"intermediate_size": 128, "vocab_size": 300}')
    (kinds["hf_bin"] / "pytorch_model.bin").write_bytes(os.urandom(4096))
    return kinds


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return wrong_kinds(tmp_path_factory.mktemp("kinds"))


@pytest.mark.parametrize("flag", ["--ref-load", "--guidance-load", "--reward-model-load", "--critic-load"])
def test_model_flags_name_the_flag_and_what_they_expect(flag, kinds):
    for kind in ("file", "empty", "random", "hf_bin"):
        line = model_dir_problem(flag, str(kinds[kind]))
        assert line is not None and line.startswith(f"{flag} {kinds[kind]}: "), (kind, line)
        assert "\n" not in line
    assert "is a file; expected a checkpoint directory" in model_dir_problem(flag, str(kinds["file"]))
    assert "holds no checkpoint" in model_dir_problem(flag, str(kinds["empty"]))
    assert "only PyTorch .bin weights" in model_dir_problem(flag, str(kinds["hf_bin"]))


def test_what_model_flags_accept(tmp_path):
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.models.llama import preset

    assert model_dir_problem("--ref-load", str(tmp_path / "missing")) is None  # validate() says "does not exist"
    assert model_dir_problem("--ref-load", None) is None
    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    assert model_dir_problem("--ref-load", str(root)) is None  # intact or not: decided (with fallback) on load
    assert model_dir_problem("--ref-load", str(root / "iter_0000002")) is None
    hf = write_synthetic_hf(tmp_path / "hf", preset("tiny"))
    assert model_dir_problem("--ref-load", str(hf)) is None


def test_load_judges_only_model_directories(kinds, tmp_path):
    # --load of an empty directory is a fresh start when it is also --save: decided when resuming.
    assert model_dir_problem("--load", str(kinds["empty"]), checkpoint_root_ok=False) is None
    line = model_dir_problem("--load", str(kinds["hf_bin"]), checkpoint_root_ok=False)
    assert line.startswith(f"--load {kinds['hf_bin']}: a Hugging Face directory whose weights cannot be read")


def test_logprob_cache_of_the_wrong_kind(kinds, tmp_path):
    from megatron_tgdpo import logprob_cache

    assert (path_checks.CACHE_FORMAT, path_checks.CACHE_MANIFEST) == (logprob_cache.FORMAT, logprob_cache.MANIFEST)
    for kind, needle in (("file", "is a file"), ("empty", "has no manifest.json"), ("random", "not a log-prob cache")):
        line = logprob_cache_problem(str(kinds[kind]))
        assert line.startswith(f"--logprob-cache {kinds[kind]}: ") and needle in line, line
        assert "tools/precompute_logprobs.py" in line
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "something-else", "format_version": 1}')
    assert "not a log-prob cache manifest" in logprob_cache_problem(str(other))
    assert logprob_cache_problem(str(tmp_path / "missing")) is None


def test_fp8_without_cuda_is_named():
    import torch

    problems = path_checks.config_problems(parse_args(["--fp8-format", "hybrid"]))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert problems == ["--fp8-format hybrid: FP8 needs a CUDA GPU and TransformerEngine; this machine has no CUDA "
                        "device: drop the flag"]


def test_data_path_of_random_files_names_the_flag(tmp_path):
    from megatron_tgdpo.config import ConfigError
    from megatron_tgdpo.runtime.setup import resolve_data

    prefix = tmp_path / "pairs"
    for suffix in (".bin", ".idx", ".manifest.json"):
        Path(f"{prefix}{suffix}").write_bytes(os.urandom(2048))
    with pytest.raises(ConfigError) as info:
        resolve_data(parse_args(["--data-path", str(prefix), "--train-iters", "1"]))
    assert str(info.value).startswith(f"--data-path {prefix}: ")
