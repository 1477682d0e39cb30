"""GGUF files read as Llama models, on a tiny file written here with the ``gguf`` package's writer.

The reference is the Hugging Face directory the file was made from: its weights (the GGUF stores
``attn_q`` / ``attn_k`` in llama.cpp's row order, produced here by llama.cpp's published permutation),
its config, and its tokenizer.json (whose vocabulary and merges the file carries).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from megatron_tgdpo import convert  # noqa: E402
from megatron_tgdpo.convert.loader import open_for_loading  # noqa: E402
from megatron_tgdpo.models.llama import LlamaArch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH = LlamaArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                 vocab_size=448, max_position_embeddings=128, rope_theta=10000.0, norm_eps=1e-5,
                 tie_word_embeddings=True)
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for q/k (pairs interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, hf_dir: Path, *, extra_f64: bool = False) -> None:
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    tokens += [f"[PAD{i}]" for i in range(len(tokens), ARCH.vocab_size)]  # a padded vocabulary, as real files
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(ARCH.num_layers)
    w.add_embedding_length(ARCH.hidden_size)
    w.add_feed_forward_length(ARCH.ffn_hidden_size)
    w.add_head_count(ARCH.num_attention_heads)
    w.add_head_count_kv(ARCH.num_query_groups)
    w.add_context_length(ARCH.max_position_embeddings)
    w.add_rope_freq_base(ARCH.rope_theta)
    w.add_layer_norm_rms_eps(ARCH.norm_eps)
    w.add_rope_dimension_count(ARCH.head_dim)
    w.add_vocab_size(ARCH.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab["<|eot_id|>"])
    w.add_chat_template(json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name, value in tensors.items():
        array = value.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", array)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", array)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            if part == "self_attn.q_proj":
                array = _llama_cpp_permute(array, ARCH.num_attention_heads)
            elif part == "self_attn.k_proj":
                array = _llama_cpp_permute(array, ARCH.num_query_groups)
            if extra_f64 and part == "mlp.up_proj" and layer == "1":
                array = array.astype(np.float64)  # F64: a type the gguf package cannot dequantize
            w.add_tensor(f"blk.{layer}.{GGUF_NAMES[part]}.weight", np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf
    from megatron_tgdpo.data.toy_tokenizers import write_llama3_style_tokenizer

    root = tmp_path_factory.mktemp("gguf")
    hf_dir = root / "hf"
    write_synthetic_hf(hf_dir, ARCH, dtype=torch.float32, seed=5)
    write_llama3_style_tokenizer(hf_dir)
    _write_gguf(root / "model.gguf", hf_dir)
    _write_gguf(root / "f64.gguf", hf_dir, extra_f64=True)
    return root, hf_dir


def test_weights_and_architecture_equal_the_source_directory(files, monkeypatch, tmp_path):
    root, hf_dir = files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arch, from_gguf = open_for_loading(root / "model.gguf")
    _, from_hf = open_for_loading(hf_dir)
    assert arch == ARCH  # float32-stored eps reads back as 1e-05
    assert set(from_gguf) == set(from_hf)
    for name in from_hf:
        assert torch.equal(from_gguf[name].read(), from_hf[name].read()), name
    # TP-style partial reads of a q/k-carrying tensor agree too
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert torch.equal(from_gguf[qkv].read(rows=(16, 80)), from_hf[qkv].read(rows=(16, 80)))


def test_tokenizer_and_template_come_from_the_file(files, monkeypatch, tmp_path):
    from megatron_tgdpo.data.tokenizer import load_tokenizer, tokenizer_content_hash

    root, hf_dir = files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ours, ref = load_tokenizer(root / "model.gguf"), load_tokenizer(hf_dir)
    text = "Sort the numbers 7 2 9 4 1234 in order, please!\nAnswer: <|eot_id|> école 🙂"
    assert ours.encode(text) == ref.encode(text)
    assert (ours.bos_id, ours.eos_id, ours.chat_template.name) == (ref.bos_id, ref.eos_id, "auto")
    assert ours.chat_template.render_prompt([]) == ref.chat_template.render_prompt([])
    assert ours.vocab_size == ARCH.vocab_size  # the padded tail is part of the file's vocabulary
    # content-addressed: the same file gives the same directory and hash
    assert tokenizer_content_hash(root / "model.gguf") == tokenizer_content_hash(root / "model.gguf")


def test_an_undequantizable_type_is_refused_by_name(files, tmp_path):
    root, _ = files
    with pytest.raises(convert.ConversionError, match=r"blk\.1\.ffn_up\.weight is stored as F64"):
        open_for_loading(root / "f64.gguf")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
                          "--hf-dir", str(root / "f64.gguf"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ,
                                                                        "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "F64" in lines[0] and "Traceback" not in run.stderr, run.stderr
