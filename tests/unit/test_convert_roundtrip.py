"""hf-to-megatron then megatron-to-hf reproduces every tensor bit for bit, the config and the tokenizer.

(Against real ``transformers`` models, and from torch_dist checkpoints saved at TP=2 / PP=2, see
tests/distributed/test_convert_parity.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_tgdpo import convert
from megatron_tgdpo.convert.synthetic import write_synthetic_hf
from megatron_tgdpo.models.llama import preset

from suite import ROOT

CLI = ROOT / "tools" / "convert_checkpoint.py"
ARCH = preset("tiny", num_attention_heads=8, num_query_groups=2, num_layers=3)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        part = load_file(file)
        assert not set(part) & set(out), f"{file.name} repeats tensors"
        out.update(part)
    return out


def _hf_dir(tmp_path: Path, *, tied: bool, dtype: torch.dtype, single_file: bool) -> Path:
    arch = preset("tiny", num_attention_heads=8, num_query_groups=2, num_layers=3, tie_word_embeddings=tied)
    hf = write_synthetic_hf(tmp_path / "hf", arch, dtype=dtype, seed=5, max_shard_size=60_000)
    if single_file:  # what save_pretrained writes for small models: one file, no index
        tensors = _tensors(hf)
        for file in hf.glob("model*"):
            file.unlink()
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    config.update(bos_token_id=128000, eos_token_id=[128001, 128009], custom_key={"kept": True})
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer.json").write_text('{"version": "1.0"}')
    (hf / "tokenizer_config.json").write_text("{}")
    return hf


@pytest.mark.parametrize(
    "tied,dtype,single_file",
    [(False, torch.float32, False), (True, torch.bfloat16, True)],
    ids=["untied-fp32-sharded", "tied-bf16-single-file"],
)
def test_round_trip_is_bit_exact(tmp_path, tied, dtype, single_file):
    hf = _hf_dir(tmp_path, tied=tied, dtype=dtype, single_file=single_file)
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    assert convert.is_converted_directory(converted) and not convert.is_hf_directory(converted)
    assert convert.is_hf_directory(hf) and not convert.is_converted_directory(hf)
    meta = json.loads((converted / "tgdpo_converted.json").read_text())
    assert meta["format_version"] == 1 and meta["hf_config"] == json.loads((hf / "config.json").read_text())
    assert sorted(meta["files"]) == sorted(p.name for p in converted.glob("*.safetensors"))

    exported = convert.megatron_to_hf(converted, tmp_path / "hf2", max_shard_size=50_000)
    original, back = _tensors(hf), _tensors(exported)
    assert set(back) == set(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    assert json.loads((exported / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (exported / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in back.values())
    assert not list(tmp_path.glob("*.tmp")), "staging directories must be renamed away"


def test_export_can_cast_and_derive_the_config(tmp_path):
    hf = _hf_dir(tmp_path, tied=False, dtype=torch.float32, single_file=False)
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    (converted / "tgdpo_converted.json").write_text(
        json.dumps(dict(json.loads((converted / "tgdpo_converted.json").read_text()), hf_config=None))
    )
    out = convert.megatron_to_hf(converted, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert convert.hf_config_to_arch(config) == convert.checkpoint_arch(hf)
    assert config["torch_dtype"] == "bfloat16"
    original = _tensors(hf)
    for name, value in _tensors(out).items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, original[name].to(torch.bfloat16)), name


def test_cli_converts_both_ways_and_reports_progress(tmp_path):
    hf = _hf_dir(tmp_path, tied=False, dtype=torch.bfloat16, single_file=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(CLI), "hf-to-megatron", "--hf-dir", str(hf), "--output", str(tmp_path / "mg")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "[2/5] layer_00000" in run.stdout and "[5/5] final" in run.stdout

    sys.path.insert(0, str(CLI.parent))
    try:
        import convert_checkpoint
    finally:
        sys.path.remove(str(CLI.parent))
    args = ["megatron-to-hf", "--load", str(tmp_path / "mg"), "--output", str(tmp_path / "out"),
            "--max-shard-size", "20KB"]
    assert convert_checkpoint.main(args) == 0
    assert all(torch.equal(v, _tensors(hf)[k]) for k, v in _tensors(tmp_path / "out").items())
    # A second run refuses to clobber the output unless asked to.
    assert convert_checkpoint.main(args) == 2
    assert convert_checkpoint.main(args + ["--overwrite"]) == 0


def test_cli_exits_non_zero_with_a_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(CLI), "megatron-to-hf", "--load", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    assert "error:" in run.stderr and "nope" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_tied_checkpoint_that_also_stores_lm_head_converts(tmp_path):
    """Some tied exports store the shared matrix twice; the copy is ignored, not an error."""
    hf = _hf_dir(tmp_path, tied=True, dtype=torch.float32, single_file=True)
    tensors = load_file(hf / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    stored = _tensors(converted)
    assert "output_layer.weight" not in stored
    assert torch.equal(stored["embedding.word_embeddings.weight"], tensors["model.embed_tokens.weight"])
