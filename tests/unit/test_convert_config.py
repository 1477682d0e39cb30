"""Hugging Face config.json <-> LlamaArch: the Llama families we support, and clear refusals."""
from __future__ import annotations

import pytest

from megatron_tgdpo.convert import ConversionError, arch_to_hf_config, hf_config_to_arch
from megatron_tgdpo.models.llama import LlamaArch, preset

# Abridged from the published config.json files (values that matter for the architecture).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000,
    "hidden_act": "silu", "torch_dtype": "float16",
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
# transformers 5 spelling (rope_parameters, dtype), Llama 3.2 1B values.
LLAMA32_1B_V5 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "vocab_size": 128256,
    "dtype": "bfloat16",
    "rope_parameters": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
}


def test_llama2_is_multi_head_with_default_rope():
    arch = hf_config_to_arch(LLAMA2_7B)
    assert arch == LlamaArch(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                             ffn_hidden_size=11008, vocab_size=32000, max_position_embeddings=4096,
                             rope_theta=10000.0, rope_scaling_factor=None, norm_eps=1e-5)


def test_llama31_gqa_and_llama3_scaling():
    arch = hf_config_to_arch(LLAMA31_8B)
    assert (arch.num_query_groups, arch.rope_theta, arch.rope_scaling_factor) == (8, 500000.0, 8.0)
    assert not arch.tie_word_embeddings


def test_transformers5_spelling_matches_the_preset():
    assert hf_config_to_arch(LLAMA32_1B_V5) == preset("llama3.2-1b")


def test_missing_kv_heads_means_multi_head():
    config = {k: v for k, v in LLAMA2_7B.items() if k != "num_key_value_heads"}
    assert hf_config_to_arch(config).num_query_groups == 32


@pytest.mark.parametrize("arch", [preset("tiny"), preset("llama3.2-1b"), preset("llama3-70b")])
def test_arch_round_trips_through_hf_config(arch):
    assert hf_config_to_arch(arch_to_hf_config(arch)) == arch


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 256}, "head_dim 256"),
        ({"num_key_value_heads": 7}, "num_key_value_heads 7"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
        ({"rope_scaling": dict(LLAMA31_8B["rope_scaling"], low_freq_factor=2.0)}, "low_freq_factor"),
        ({"rope_scaling": dict(LLAMA31_8B["rope_scaling"], original_max_position_embeddings=4096)},
         "original_max_position_embeddings"),
        ({"rope_theta": 500000.5}, "not an integer"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_configs_are_refused_by_name(change, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        hf_config_to_arch({**LLAMA31_8B, **change})


def test_conflicting_rope_theta_spellings_are_refused():
    with pytest.raises(ConversionError, match="must agree"):
        hf_config_to_arch({**LLAMA32_1B_V5, "rope_theta": 10000.0})
