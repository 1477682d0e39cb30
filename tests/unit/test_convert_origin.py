"""convert/origin.py: which model a run records as its origin, and the tokenizer checks at export."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_tgdpo.convert import ConversionError
from megatron_tgdpo.convert.origin import checked_tokenizer_dir, run_origin, tokenizer_record
from megatron_tgdpo.convert.synthetic import write_synthetic_hf
from megatron_tgdpo.models.llama import LlamaArch

ARCH = LlamaArch(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
                 vocab_size=64, max_position_embeddings=64, rope_theta=10000.0)


def _hf(path, name=None, generation=None):
    write_synthetic_hf(path, ARCH, dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    if name:
        config["_name_or_path"] = name
    (path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def _tokenizer(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text('{"model": {}}')
    (path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return path


def _checkpoint(root, state):
    """A torch_dist save root as far as its metadata goes (no tensors: enough to read the origin)."""
    ckpt = root / "iter_0000004"
    ckpt.mkdir(parents=True)
    meta = {"format": "megatron_tgdpo.checkpoint", "format_version": 2, "iteration": 4, "files": {}, **state}
    (ckpt / "tgdpo_checkpoint.json").write_text(json.dumps(meta))
    return root


def test_the_start_model_decides_and_its_name_and_generation_config_come_along(tmp_path):
    ref = _hf(tmp_path / "ref", generation={"temperature": 0.6})
    start = _hf(tmp_path / "start", name="org/Start-1B")
    tok = _tokenizer(tmp_path / "tok")
    state = run_origin(load=None, ref_load=str(ref), tokenizer=str(tok / "tokenizer.json"))
    assert state["model_name"] == "ref" and state["hf_config"] == json.loads((ref / "config.json").read_text())
    assert state["origin"]["model"] == os.path.abspath(ref)
    assert state["origin"]["generation_config"] == {"temperature": 0.6}
    assert state["origin"]["tokenizer"] == tokenizer_record(tok)
    # --load naming a model directory is where the policy starts: it wins over --ref-load
    state = run_origin(load=str(start), ref_load=str(ref), tokenizer=str(tok))
    assert state["model_name"] == "Start-1B" and state["origin"]["generation_config"] is None
    # a resumed run (--load a checkpoint) keeps the lineage its checkpoint records
    saved = _checkpoint(tmp_path / "save", {"model_name": "Start-1B", "hf_config": {"a": 1},
                                            "origin": {"format_version": 1, "model": str(start),
                                                       "generation_config": None, "tokenizer": None}})
    state = run_origin(load=str(saved), ref_load=str(ref), tokenizer=str(tok))
    assert state["hf_config"] == {"a": 1} and state["origin"]["model"] == str(start)
    assert state["origin"]["tokenizer"] == tokenizer_record(tok)  # always this run's tokenizer
    # no model at all (a preset): nothing but the tokenizer
    state = run_origin(load=None, ref_load=None, tokenizer=str(tok))
    assert state["hf_config"] is None and state["origin"]["model"] is None and "model_name" not in state


def test_a_symlinked_tokenizer_is_recorded_where_it_was_given(tmp_path):
    blobs = _tokenizer(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).symlink_to(blobs / name)  # as in a Hugging Face hub cache
    record = tokenizer_record(snapshot / "tokenizer.json")
    assert record["path"] == str(snapshot) and record["file"] == "tokenizer.json"
    assert checked_tokenizer_dir(record, given=None, where="ckpt") == snapshot


def test_recorded_tokenizer_moved_changed_or_overridden(tmp_path):
    tok = _tokenizer(tmp_path / "tok")
    record = tokenizer_record(tok)
    assert checked_tokenizer_dir(record, given=None, where="ckpt") == tok
    said = []
    other = _tokenizer(tmp_path / "other")
    (other / "tokenizer.json").write_text('{"model": {"x": 1}}')
    assert checked_tokenizer_dir(record, given=other, where="ckpt", say=said.append) == other
    assert "is not the tokenizer this model was trained with" in said[0]
    (tok / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    with pytest.raises(ConversionError, match="changed since training.*--tokenizer-dir"):
        checked_tokenizer_dir(record, given=None, where="ckpt")
    os.rename(tok, tmp_path / "elsewhere")
    with pytest.raises(ConversionError, match="has moved or been deleted; pass --tokenizer-dir"):
        checked_tokenizer_dir(record, given=None, where="ckpt")
    assert checked_tokenizer_dir(None, given=None, where="ckpt") is None
