"""Which rows of which Hugging Face tensor make up each megatron-core tensor, and back.

The megatron *full* layout is TP=1 with global layer numbers (see :mod:`megatron_tgdpo.models.state_dict`).
Every megatron tensor is a concatenation along dim 0 of row ranges of HF tensors:

* ``linear_qkv.weight``: for each query group g, ``[q rows of g's heads; k rows of g; v rows of g]``.
  No RoPE permutation: HF ``transformers`` Llama and megatron's RoPE with ``rotary_interleaved=False``
  both rotate halves (``rotate_half``), so q/k rows keep their order. The parity test pins this.
* ``linear_fc1.weight``: ``[gate_proj; up_proj]``.
* everything else: the one HF tensor, unchanged.

Both directions are derived from one table (:func:`megatron_from_hf`); :func:`hf_from_megatron` inverts it
mechanically, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.models.llama import LlamaArch

# Aliases megatron uses in torch_dist checkpoints (and as TransformerEngine parameter names): the norms
# are fused into the following linear layer there.
LAYER_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# HF tensors that are derived buffers, not weights (old Llama exports saved the RoPE table).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of tensor ``name``."""

    name: str
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def _layer_megatron(arch: LlamaArch, i: int) -> dict[str, tuple[int, ...]]:
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
    p = f"decoder.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attention.linear_qkv.weight": (qkv_rows, h),
        p + "self_attention.linear_proj.weight": (h, arch.num_attention_heads * hd),
        p + "pre_mlp_layernorm.weight": (h,),
        p + "mlp.linear_fc1.weight": (2 * f, h),
        p + "mlp.linear_fc2.weight": (h, f),
    }


def megatron_groups(arch: LlamaArch) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(group name, {megatron name: shape}) in file/progress order: embedding, each layer, final."""
    groups = [("embedding", {"embedding.word_embeddings.weight": (arch.vocab_size, arch.hidden_size)})]
    groups += [(f"layer_{i:05d}", _layer_megatron(arch, i)) for i in range(arch.num_layers)]
    final = {"decoder.final_layernorm.weight": (arch.hidden_size,)}
    if not arch.tie_word_embeddings:
        final["output_layer.weight"] = (arch.vocab_size, arch.hidden_size)
    groups.append(("final", final))
    return groups


def megatron_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    return {name: shape for _, group in megatron_groups(arch) for name, shape in group.items()}


def _layer_hf(arch: LlamaArch, i: int) -> dict[str, tuple[int, ...]]:
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (arch.num_attention_heads * hd, h),
        p + "self_attn.k_proj.weight": (arch.num_query_groups * hd, h),
        p + "self_attn.v_proj.weight": (arch.num_query_groups * hd, h),
        p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * hd),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }


def hf_groups(arch: LlamaArch) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(group name, {HF name: shape}) in the order we write HF shards."""
    groups = [("embedding", {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)})]
    groups += [(f"layer_{i:05d}", _layer_hf(arch, i)) for i in range(arch.num_layers)]
    final = {"model.norm.weight": (arch.hidden_size,)}
    if not arch.tie_word_embeddings:
        final["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    groups.append(("final", final))
    return groups


def hf_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    return {name: shape for _, group in hf_groups(arch) for name, shape in group.items()}


def megatron_from_hf(arch: LlamaArch) -> dict[str, list[Rows]]:
    """megatron full name -> the HF row ranges whose concatenation (dim 0) is that tensor."""
    hf = hf_shapes(arch)

    def whole(name: str) -> list[Rows]:
        return [Rows(name, 0, hf[name][0])]

    hd, groups, f = arch.head_dim, arch.num_query_groups, arch.ffn_hidden_size
    q_rows = arch.num_attention_heads // groups * hd  # query rows per group
    out: dict[str, list[Rows]] = {"embedding.word_embeddings.weight": whole("model.embed_tokens.weight")}
    for i in range(arch.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = whole(p + "input_layernorm.weight")
        qkv = []
        for g in range(groups):
            qkv.append(Rows(p + "self_attn.q_proj.weight", g * q_rows, (g + 1) * q_rows))
            qkv.append(Rows(p + "self_attn.k_proj.weight", g * hd, (g + 1) * hd))
            qkv.append(Rows(p + "self_attn.v_proj.weight", g * hd, (g + 1) * hd))
        out[m + "self_attention.linear_qkv.weight"] = qkv
        out[m + "self_attention.linear_proj.weight"] = whole(p + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = whole(p + "post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = [Rows(p + "mlp.gate_proj.weight", 0, f),
                                             Rows(p + "mlp.up_proj.weight", 0, f)]
        out[m + "mlp.linear_fc2.weight"] = whole(p + "mlp.down_proj.weight")
    out["decoder.final_layernorm.weight"] = whole("model.norm.weight")
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = whole("lm_head.weight")
    return out


def hf_from_megatron(arch: LlamaArch) -> dict[str, list[Rows]]:
    """HF name -> the megatron row ranges whose concatenation is that tensor (inverse of the table)."""
    pieces: dict[str, list[tuple[int, Rows]]] = {}
    for m_name, parts in megatron_from_hf(arch).items():
        cursor = 0
        for part in parts:
            pieces.setdefault(part.name, []).append((part.start, Rows(m_name, cursor, cursor + part.count)))
            cursor += part.count
    shapes = hf_shapes(arch)
    out = {}
    for h_name, found in pieces.items():
        found.sort(key=lambda item: item[0])
        expect = 0
        for start, rows in found:  # the table must tile every HF tensor exactly once
            if start != expect:
                raise AssertionError(f"layout table leaves a gap/overlap in {h_name} at row {expect}")
            expect += rows.count
        if expect != shapes[h_name][0]:
            raise AssertionError(f"layout table covers {expect} of {shapes[h_name][0]} rows of {h_name}")
        out[h_name] = [rows for _, rows in found]
    return {name: out[name] for name in shapes}  # HF write order


def canonical_layer_name(name: str) -> str:
    """Local-spec megatron name for a TransformerEngine / torch_dist alias (identity otherwise)."""
    for local, alias in LAYER_ALIASES.items():
        if name.endswith("." + alias):
            return name[: -len(alias)] + local
    return name


def check_hf_names(arch: LlamaArch, names: set[str], *, where: str) -> None:
    """Raise for HF tensors the model does not have (biases above all) and for missing ones."""
    expected = set(hf_shapes(arch))
    extra = {n for n in names - expected if not n.endswith(IGNORED_HF_SUFFIXES)}
    if arch.tie_word_embeddings:
        extra.discard("lm_head.weight")  # some tied exports store the shared matrix twice; it is ignored
    biases = sorted(n for n in extra if n.endswith(".bias"))
    if biases:
        raise ConversionError(
            f"{where}: has bias tensors ({', '.join(biases[:3])}{', ...' if len(biases) > 3 else ''}); "
            "the megatron Llama model has no linear biases, so this checkpoint is not supported"
        )
    if extra:
        raise ConversionError(
            f"{where}: unexpected tensors {sorted(extra)[:5]} (not part of LlamaForCausalLM for this config.json); "
            "is config.json the right one for these weights?"
        )
    missing = sorted(expected - names)
    if missing:
        raise ConversionError(
            f"{where}: missing {len(missing)} tensors, e.g. {missing[:3]}; the checkpoint is incomplete or "
            "config.json does not match it (num_hidden_layers, tie_word_embeddings)"
        )
