"""A GGUF file (llama.cpp's format) as a Llama model: architecture, fp32 weights, tokenizer.

Read as lazy tensors under their Hugging Face names, so everything that takes a Hugging Face
directory (direct loading at any TP/PP, ``hf-to-megatron``, export) takes a ``.gguf`` the same way.

* **Weights** are dequantized to fp32 by the ``gguf`` package, one tensor at a time when a rank
  reads it. Every type that package can dequantize is accepted (F32, F16, BF16, Q4_0 ... Q8_0, the
  K-quants, the IQ types); a file holding another type is refused naming the type and tensor.
* **Q/K rows**: llama.cpp's converter reorders the rows of each head of ``attn_q`` / ``attn_k`` for
  its interleaved-pair RoPE; Llama files always store them that way (no metadata flag says so), so
  the order is undone here, as transformers' GGUF loader does, to the half-split RoPE megatron and
  transformers use.
* **Architecture** from the ``llama.*`` metadata; the embedding is tied exactly when the file has no
  ``output.weight``. GGUF stores floats as float32, so ``rms_norm_eps`` 1e-5 reads back as
  9.99999974e-06: each float is taken as the shortest decimal that round-trips through float32
  (1e-05), i.e. the value the file was written from. The two differ by 2.5e-13 absolute, far below
  fp32 resolution of the normalised activations.
* **Tokenizer and chat template** from the file's metadata (:mod:`megatron_tgdpo.data.gguf_tokenizer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.files import staged_output, write_json
from megatron_tgdpo.convert.hf_config import arch_to_hf_config
from megatron_tgdpo.convert.layout import check_hf_names, hf_shapes
from megatron_tgdpo.convert.safetensors_io import SafetensorsWriter
from megatron_tgdpo.convert.views import Range, TensorView
from megatron_tgdpo.data.errors import TokenizerError
from megatron_tgdpo.data.gguf_file import GGUFFile, GGUFFormatError, GGUFTensorInfo
from megatron_tgdpo.data.gguf_tokenizer import gguf_tokenizer_files, is_gguf_file
from megatron_tgdpo.models.llama import LlamaArch

__all__ = ["GGUFModel", "gguf_to_hf", "is_gguf_file", "open_gguf"]

# GGUF (llama.cpp) tensor names -> Hugging Face LlamaForCausalLM names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(name: str) -> Optional[str]:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _float32_decimal(value: float) -> float:
    """The shortest decimal that round-trips through float32 (how GGUF stored it)."""
    return float(str(np.float32(value)))


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def _check_dequantizable(info: GGUFTensorInfo, *, where: str) -> None:
    """Raise naming the type unless the gguf package can dequantize ``info``'s type."""
    import gguf

    name = _type_name(info.ggml_type)
    try:
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        _block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        raise ConversionError(
            f"{where}: tensor {info.name} is stored as {name}, which the gguf package cannot dequantize; "
            "use a file quantized to another type (F16, BF16, Q8_0, Q4_K, ...)"
        ) from None


def _unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order (pairs interleaved) to transformers' (halves)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFTensorView(TensorView):
    """One tensor of a GGUF file, dequantized to fp32 when read (the whole tensor, then sliced; the
    last one read is kept so a fused tensor assembled from several row ranges dequantizes once)."""

    dtype = torch.float32
    _last: tuple[tuple[str, str], torch.Tensor] | None = None

    def __init__(self, path: Path, info: GGUFTensorInfo, *, rope_heads: Optional[int] = None):
        self.path, self.info, self.rope_heads = Path(path), info, rope_heads
        self.shape = info.shape
        self.label = f"{info.name} in {self.path}"

    def _full(self) -> torch.Tensor:
        key = (str(self.path), self.info.name)
        cached = GGUFTensorView._last
        if cached is not None and cached[0] == key:
            return cached[1]
        import gguf

        qtype = gguf.GGMLQuantizationType(self.info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        inner = self.info.dims[0]
        row_bytes = inner // block * type_size
        outer = self.shape[:-1]
        count = int(np.prod(outer, dtype=np.int64)) * row_bytes
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.info.offset, shape=(count,))
        values = gguf.quants.dequantize(np.asarray(raw).reshape(*outer, row_bytes), qtype)
        tensor = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(self.shape)  # a copy: writable
        if self.rope_heads is not None:
            tensor = _unpermute_rope_rows(tensor, self.rope_heads)
        GGUFTensorView._last = (key, tensor)
        return tensor

    def read(self, *, rows: Range = None, cols: Range = None) -> torch.Tensor:
        out = self._full()
        if rows is not None:
            out = out[rows[0] : rows[1]]
        if cols is not None:
            out = out[:, cols[0] : cols[1]]
        return out.clone()


class GGUFModel:
    """The parsed header of a GGUF Llama file: ``fields``, ``arch``, HF-named lazy ``views``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.file = GGUFFile(self.path)
        except GGUFFormatError as exc:
            raise ConversionError(str(exc)) from None
        self.fields = self.file.fields
        self.arch = self._arch()
        self.views = self._views()

    def _field(self, key: str, default: Any = None, *, required: bool = True) -> Any:
        value = self.fields.get(key, default)
        if value is None and required:
            raise ConversionError(f"{self.path}: GGUF metadata lacks {key!r}; it is required for a Llama model")
        return value

    def _arch(self) -> LlamaArch:
        family = self.fields.get("general.architecture")
        if family != "llama":
            raise ConversionError(
                f"{self.path}: general.architecture is {family!r}; only 'llama' GGUF files are supported"
            )
        p = "llama."
        scaling = self.fields.get(p + "rope.scaling.type")
        if (scaling not in (None, "none")) or "rope_freqs.weight" in self.file.tensors:
            raise ConversionError(f"{self.path}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported in "
                                  "GGUF files; convert the model's Hugging Face directory instead")
        hidden, heads = int(self._field(p + "embedding_length")), int(self._field(p + "attention.head_count"))
        groups = int(self._field(p + "attention.head_count_kv", heads))
        rope_dims = self.fields.get(p + "rope.dimension_count")
        if hidden % heads or (rope_dims is not None and int(rope_dims) != hidden // heads):
            raise ConversionError(f"{self.path}: head size {hidden}/{heads} with RoPE over {rope_dims} dimensions "
                                  "is not supported (RoPE must cover the whole head)")
        embedding = self.file.tensors.get("token_embd.weight")
        if embedding is None:
            raise ConversionError(f"{self.path}: has no token_embd.weight tensor")
        vocab = int(self.fields.get(p + "vocab_size") or embedding.shape[0])
        theta = _float32_decimal(float(self._field(p + "rope.freq_base", 10000.0)))
        if not theta.is_integer():
            raise ConversionError(f"{self.path}: rope.freq_base {theta} is not an integer; megatron-core takes an "
                                  "integer rotary base")
        return LlamaArch(
            num_layers=int(self._field(p + "block_count")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=int(self._field(p + "feed_forward_length")),
            vocab_size=vocab,
            max_position_embeddings=int(self._field(p + "context_length", 2048)),
            rope_theta=theta,
            rope_scaling_factor=None,
            norm_eps=_float32_decimal(float(self._field(p + "attention.layer_norm_rms_epsilon", 1e-5))),
            tie_word_embeddings="output.weight" not in self.file.tensors,
        )

    def _views(self) -> dict[str, TensorView]:
        arch, views, unknown, checked = self.arch, {}, [], set()
        for name, info in self.file.tensors.items():
            hf = _hf_name(name)
            if hf is None:
                unknown.append(name)
                continue
            if info.ggml_type not in checked:
                _check_dequantizable(info, where=str(self.path))
                checked.add(info.ggml_type)
            heads = (arch.num_attention_heads if name.endswith("attn_q.weight")
                     else arch.num_query_groups if name.endswith("attn_k.weight") else None)
            views[hf] = GGUFTensorView(self.path, info, rope_heads=heads)
        if unknown:
            raise ConversionError(f"{self.path}: tensors {sorted(unknown)[:5]} are not part of a Llama model; "
                                  "this GGUF file is not supported")
        check_hf_names(arch, set(views), where=str(self.path))
        wrong = [f"{n}: {views[n].shape}, expected {s}" for n, s in hf_shapes(arch).items() if views[n].shape != s]
        if wrong:
            raise ConversionError(f"{self.path}: tensor shapes do not match its metadata:\n  " + "\n  ".join(wrong[:8]))
        return views

    def hf_config(self) -> dict:
        """A ``LlamaForCausalLM`` config.json (fp32) with the file's special token ids."""
        config = arch_to_hf_config(self.arch, dtype="float32")
        for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
            value = self.fields.get(f"tokenizer.ggml.{key}_token_id")
            if value is not None:
                config[name] = int(value)
        return config

    def generation_config(self) -> dict:
        config = {k: v for k, v in self.hf_config().items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return {**config, "_from_model_config": True}

    def tokenizer_files(self) -> dict[str, str]:
        try:
            return gguf_tokenizer_files(self.path, fields=self.fields)
        except TokenizerError as exc:
            raise ConversionError(str(exc)) from None


def open_gguf(path: str | Path) -> tuple[dict, LlamaArch, dict[str, TensorView]]:
    """(config.json, arch, HF name -> view) of a GGUF file, like :func:`.hf_source.open_hf`."""
    model = GGUFModel(path)
    return model.hf_config(), model.arch, model.views


def gguf_to_hf(
    path: str | Path, out_dir: str | Path, *, overwrite: bool = False, progress: Optional[Callable[[str], None]] = None
) -> Path:
    """Write a Hugging Face directory (fp32 ``model.safetensors``, config.json, generation_config.json,
    tokenizer.json, tokenizer_config.json with the chat template) for the GGUF file at ``path``."""
    say = progress or (lambda message: None)
    model = GGUFModel(path)
    shapes = hf_shapes(model.arch)
    tokenizer = model.tokenizer_files()
    with staged_output(Path(out_dir), overwrite=overwrite) as tmp:
        entries = [(name, torch.float32, shape) for name, shape in shapes.items()]
        with SafetensorsWriter(tmp / "model.safetensors", entries) as writer:
            for name in shapes:
                writer.write(name, model.views[name].blocks())
        write_json(tmp / "config.json", model.hf_config())
        write_json(tmp / "generation_config.json", model.generation_config())
        for name, text in tokenizer.items():
            (tmp / name).write_text(text, encoding="utf-8")
        say(f"{path}: {model.arch.num_layers} layers, hidden {model.arch.hidden_size}, vocab {model.arch.vocab_size}, "
            f"tied={model.arch.tie_word_embeddings} -> {out_dir}")
    return Path(out_dir)
