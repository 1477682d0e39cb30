"""The HF <-> megatron row mapping, and that lazy shard reads equal ``shard_tensor`` of the full tensor."""
from __future__ import annotations

import pytest
import torch

from megatron_tgdpo.convert.hf_source import megatron_views_from_hf
from megatron_tgdpo.convert.layout import hf_from_megatron, hf_shapes, megatron_shapes
from megatron_tgdpo.convert.views import ConcatRows, TensorView, read_shard
from megatron_tgdpo.models.llama import preset
from megatron_tgdpo.models.state_dict import shard_tensor

ARCH = preset("tiny", num_attention_heads=8, num_query_groups=2, num_layers=2)


class Memory(TensorView):
    """An in-memory leaf view that records which rows/cols were requested."""

    def __init__(self, value: torch.Tensor, label: str = "mem"):
        self.value, self.shape, self.dtype, self.label, self.reads = value, tuple(value.shape), value.dtype, label, []

    def read(self, *, rows=None, cols=None):
        self.reads.append((rows, cols))
        out = self.value if rows is None else self.value[rows[0] : rows[1]]
        return out if cols is None else out[:, cols[0] : cols[1]]


def _hf_tensors(arch):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in hf_shapes(arch).items()}


def _reference_qkv(q, k, v, arch):
    """megatron's grouped layout written out directly: per group [its q heads, its k head, its v head]."""
    hd, groups = arch.head_dim, arch.num_query_groups
    q = q.view(groups, -1, arch.hidden_size)
    k = k.view(groups, hd, arch.hidden_size)
    v = v.view(groups, hd, arch.hidden_size)
    return torch.cat([q, k, v], dim=1).reshape(-1, arch.hidden_size)


def test_qkv_and_fc1_layouts():
    hf = _hf_tensors(ARCH)
    views = megatron_views_from_hf(ARCH, {n: Memory(t) for n, t in hf.items()})
    p = "model.layers.1."
    qkv = views["decoder.layers.1.self_attention.linear_qkv.weight"].read()
    want = _reference_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                          hf[p + "self_attn.v_proj.weight"], ARCH)
    assert torch.equal(qkv, want)
    fc1 = views["decoder.layers.1.mlp.linear_fc1.weight"].read()
    assert torch.equal(fc1, torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
    norm = views["decoder.layers.1.pre_mlp_layernorm.weight"].read()
    assert torch.equal(norm, hf[p + "post_attention_layernorm.weight"])
    assert {n: tuple(v.shape) for n, v in views.items()} == megatron_shapes(ARCH)


@pytest.mark.parametrize("tied", [False, True])
def test_inverse_table_reproduces_every_hf_tensor(tied):
    arch = preset("tiny", num_attention_heads=8, num_query_groups=4, num_layers=2, tie_word_embeddings=tied)
    hf = _hf_tensors(arch)
    megatron = {n: v.read() for n, v in megatron_views_from_hf(arch, {n: Memory(t) for n, t in hf.items()}).items()}
    assert ("output_layer.weight" in megatron) == (not tied)
    back = hf_from_megatron(arch)
    assert list(back) == list(hf_shapes(arch))
    for name, rows in back.items():
        rebuilt = ConcatRows([(Memory(megatron[r.name]), r.start, r.stop) for r in rows], label=name).read()
        assert torch.equal(rebuilt, hf[name]), name


@pytest.mark.parametrize("tp", [1, 2])
def test_shard_reads_match_shard_tensor_and_read_only_their_rows(tp):
    hf = _hf_tensors(ARCH)
    leaves = {n: Memory(t) for n, t in hf.items()}
    views = megatron_views_from_hf(ARCH, leaves)
    split = {  # megatron's partition dim and stride per tensor kind
        "linear_qkv.weight": (0, 1), "linear_fc1.weight": (0, 2), "linear_proj.weight": (1, 1),
        "linear_fc2.weight": (1, 1), "word_embeddings.weight": (0, 1), "output_layer.weight": (0, 1),
    }
    for name, view in views.items():
        dim, stride = next((v for k, v in split.items() if name.endswith(k)), (-1, 1))
        full = view.read()
        for rank in range(tp):
            got = read_shard(view, dim=dim, stride=stride, rank=rank, size=tp)
            want = full if dim < 0 else shard_tensor(full, dim=dim, stride=stride, rank=rank, size=tp)
            assert torch.equal(got, want), (name, rank)
    # A TP rank's qkv shard touches only its own query groups' rows of q/k/v.
    leaves = {n: Memory(t) for n, t in hf.items()}
    qkv = megatron_views_from_hf(ARCH, leaves)["decoder.layers.0.self_attention.linear_qkv.weight"]
    read_shard(qkv, dim=0, stride=1, rank=1, size=2)
    k_reads = leaves["model.layers.0.self_attn.k_proj.weight"].reads
    hd = ARCH.head_dim
    assert k_reads == [((hd, 2 * hd), None)]  # group 1 of 2 only


def test_transformer_engine_norm_names_map_to_local_names():
    from megatron_tgdpo.convert.layout import canonical_layer_name

    assert canonical_layer_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_layer_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert canonical_layer_name("decoder.layers.3.mlp.linear_fc1.weight") == "decoder.layers.3.mlp.linear_fc1.weight"
