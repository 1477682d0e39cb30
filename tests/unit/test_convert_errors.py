"""Broken or unsupported checkpoints fail with a message that names the problem, and leave no output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_tgdpo import convert
from megatron_tgdpo.convert import ConversionError
from megatron_tgdpo.convert.synthetic import write_synthetic_hf
from megatron_tgdpo.models.llama import preset

ARCH = preset("tiny", num_attention_heads=8, num_query_groups=2, num_layers=2)


@pytest.fixture()
def hf(tmp_path) -> Path:
    return write_synthetic_hf(tmp_path / "hf", ARCH, dtype=torch.float32, max_shard_size=40_000)


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _index(hf: Path) -> dict:
    return json.loads((hf / "model.safetensors.index.json").read_text())


def _rewrite_file_of(hf: Path, name: str, edit) -> None:
    """Rewrite the shard holding ``name`` with ``edit(tensors)`` applied."""
    file = hf / _index(hf)["weight_map"][name]
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _fails(hf: Path, out: Path, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        convert.hf_to_megatron(hf, out)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_unsupported_architecture(hf, tmp_path):
    _edit_config(hf, model_type="mistral", architectures=["MistralForCausalLM"])
    _fails(hf, tmp_path / "out", "model_type 'mistral' is not supported")


def test_missing_shard_file(hf, tmp_path):
    missing = _index(hf)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (hf / missing).unlink()
    _fails(hf, tmp_path / "out", f"missing from .*{missing}")


def test_bias_in_config(hf, tmp_path):
    _edit_config(hf, attention_bias=True)
    _fails(hf, tmp_path / "out", "attention_bias=true is not supported")


def test_bias_tensor_in_weights(hf, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_file_of(hf, name, lambda t: t.update({name.replace("weight", "bias"): torch.zeros(64)}))
    index = _index(hf)
    index["weight_map"][name.replace("weight", "bias")] = index["weight_map"][name]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(hf, tmp_path / "out", "bias tensors .*q_proj.bias")


def test_tensor_listed_in_index_but_not_in_its_file(hf, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite_file_of(hf, name, lambda t: t.pop(name))
    _fails(hf, tmp_path / "out", f"lacks tensor '{name}'")


def test_tensor_missing_altogether(hf, tmp_path):
    name = "lm_head.weight"
    _rewrite_file_of(hf, name, lambda t: t.pop(name))
    index = _index(hf)
    del index["weight_map"][name]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(hf, tmp_path / "out", "missing 1 tensors, e.g. \\['lm_head.weight'\\]")


def test_shape_mismatch_with_config(hf, tmp_path):
    _edit_config(hf, num_key_value_heads=4)  # weights were written for 2 KV heads
    _fails(hf, tmp_path / "out", r"k_proj.weight: \(16, 64\) in model-.*, expected \(32, 64\)")


def test_pytorch_bin_only(tmp_path):
    hf = tmp_path / "bin"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(convert.arch_to_hf_config(ARCH)))
    (hf / "pytorch_model.bin").write_bytes(b"")
    assert convert.is_hf_directory(hf)
    _fails(hf, tmp_path / "out", "only PyTorch .bin weights")


def test_export_needs_a_checkpoint_and_a_matching_config(hf, tmp_path):
    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        convert.megatron_to_hf(tmp_path / "nowhere", tmp_path / "out")
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    other = dict(convert.arch_to_hf_config(ARCH), num_hidden_layers=3)
    with pytest.raises(ConversionError, match="num_layers: 2 vs 3"):
        convert.megatron_to_hf(converted, tmp_path / "out", hf_config=other)
    assert not (tmp_path / "out").exists()


def test_converted_directory_with_a_missing_file(hf, tmp_path):
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    (converted / "layer_00001.safetensors").unlink()
    with pytest.raises(ConversionError, match="lists layer_00001.safetensors, which is missing"):
        convert.megatron_to_hf(converted, tmp_path / "out")


def test_newer_converted_format_is_refused(hf, tmp_path):
    converted = convert.hf_to_megatron(hf, tmp_path / "mg")
    meta = json.loads((converted / "tgdpo_converted.json").read_text())
    (converted / "tgdpo_converted.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ConversionError, match="format_version 99 is newer"):
        convert.checkpoint_arch(converted)
