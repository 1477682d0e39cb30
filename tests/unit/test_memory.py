"""The per-GPU memory estimate: parameter counts, a hand-computed llama3-8b budget, and how the parts
scale with TP / PP / DP / CP, sequence parallelism, the distributed optimizer and the loss type."""
from __future__ import annotations

import json

import pytest

from megatron_tgdpo import memory
from megatron_tgdpo.models import llama

from suite import load_tool

GIB = 2.0**30


def _all_stages(arch, *, t: int, p: int) -> float:
    """Parameters of one TP rank summed over every pipeline stage (middle stages included)."""
    total = 0.0
    for rank in range(p):
        total += memory.stage_parameters(arch, tensor_model_parallel_size=t, pipeline_model_parallel_size=p,
                                         first=rank == 0, last=rank == p - 1).total
    return total


@pytest.mark.parametrize("name", sorted(llama.PRESETS))
def test_parameter_counts_match_the_model(name):
    arch = llama.preset(name)
    assert _all_stages(arch, t=1, p=1) == arch.num_parameters()
    assert _all_stages(arch, t=1, p=4) == arch.num_parameters() + (arch.vocab_size * arch.hidden_size if arch.tie_word_embeddings else 0)
    # TP shards everything but the norms, which every TP rank holds whole.
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    assert _all_stages(arch, t=4, p=1) * 4 == pytest.approx(arch.num_parameters() + 3 * norms, rel=0, abs=1e-3)


def test_llama3_8b_hand_computed_budget():
    """TP4 x DP4, bf16, distributed optimizer, SP, TGDPO, 1 pair x 2048 tokens: every row by hand (float64)."""
    arch = llama.preset("llama3-8b")
    h, f, kv, v, L, a = 4096.0, 14336.0, 1024.0, 128256.0, 32.0, 32.0
    layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    assert L * layer + 2 * v * h + h == 8_030_261_248 == arch.num_parameters()  # 8.03B

    t, d = 4.0, 4.0
    local = L * ((h * (h + 2 * kv) + h * h + 3 * h * f) / t + 2 * h) + 2 * v * h / t + h
    tokens = 2 * 2048.0
    per_token_layer = (12 * h + 4 * kv + 6 * f + 4 * a) / t
    activations = L * tokens * per_token_layer + 2 * 2 * h * tokens / t
    logits = 2 * tokens * (v / t) * 2 + 4 * min(4096.0, tokens) * (v / t)  # bf16 logits + grad, fp32 chunk
    expected = {
        "policy_weights": 2 * local,
        "gradients": 4 * local,
        "optimizer": 12 * local / d,
        "frozen_weights": 2 * 2 * local,
        "activations": activations,
        "logits": logits,
    }
    est = memory.estimate(arch, num_gpus=16, micro_batch_size=1, seq_length=2048, tensor_model_parallel_size=4,
                          sequence_parallel=True, use_distributed_optimizer=True, bf16=True, loss_type="tgdpo",
                          global_batch_size=128, logits_chunk_size=4096)
    (stage,) = est.stages
    assert est.data_parallel_size == 4 and est.num_microbatches == 32
    assert stage.parameters == pytest.approx(local, rel=1e-12)
    for key, value in expected.items():
        assert getattr(stage, key) == pytest.approx(value, rel=1e-12), key
    assert stage.total == pytest.approx(sum(expected.values()), rel=1e-12)
    assert 25 * GIB < stage.total < 35 * GIB  # a plausible number, not only a self-consistent one


def _est(name="llama3-8b", **kw):
    base = dict(num_gpus=64, micro_batch_size=1, seq_length=4096, bf16=True, loss_type="tgdpo")
    base.update(kw)
    return memory.estimate(llama.preset(name), **base)


def test_tensor_parallel_divides_weights_grads_and_activations():
    previous = None
    for t in (1, 2, 4, 8):
        stage = _est(tensor_model_parallel_size=t, sequence_parallel=t > 1).worst
        if previous is not None:
            for key in ("policy_weights", "gradients", "frozen_weights", "activations", "logits", "total"):
                assert getattr(stage, key) < getattr(previous, key), (t, key)
            # The transformer weights split exactly; only norms stay whole: close to halving.
            assert stage.policy_weights == pytest.approx(previous.policy_weights / 2, rel=1e-3)
        previous = stage


def test_pipeline_parallel_divides_parameters_and_first_stage_holds_all_layers_in_flight():
    one = _est("llama3-70b", tensor_model_parallel_size=8)
    four = _est("llama3-70b", tensor_model_parallel_size=8, pipeline_model_parallel_size=4)
    first, last = four.stages
    assert (first.name, last.name) == ("first", "last")
    assert first.parameters < one.worst.parameters / 3
    assert first.parameters + last.parameters < one.worst.parameters
    # 1F1B: the first stage holds PP micro-batches of L/PP layers (as much as without PP), the last one;
    # the final norm's two saved tensors live on the last stage.
    final_norm = 2 * 2 * 8192 * (2 * 4096)
    assert first.activations == pytest.approx(one.worst.activations - final_norm, rel=1e-12)
    assert last.activations == pytest.approx(first.activations / 4 + final_norm, rel=1e-12)
    assert memory.in_flight_layers(num_layers=80, pipeline_model_parallel_size=4, pipeline_rank=0) == 80
    assert memory.in_flight_layers(num_layers=80, pipeline_model_parallel_size=4, pipeline_rank=3) == 20
    assert last.logits == one.worst.logits > 0 and first.logits == 0
    # Interleaving costs the first stage (1 + (p - 1) / (p v)) times more; few micro-batches cap it.
    assert memory.in_flight_layers(num_layers=80, pipeline_model_parallel_size=4,
                                   virtual_pipeline_model_parallel_size=5, pipeline_rank=0) == pytest.approx(80 * (1 + 3 / 20))
    assert memory.in_flight_layers(num_layers=80, pipeline_model_parallel_size=4, pipeline_rank=0, num_microbatches=2) == 40


def test_distributed_optimizer_divides_optimizer_state_by_data_parallel():
    for gpus in (8, 16, 32, 64):  # TP 8: DP 1, 2, 4, 8
        plain = _est(num_gpus=gpus, tensor_model_parallel_size=8).worst
        dist = _est(num_gpus=gpus, tensor_model_parallel_size=8, use_distributed_optimizer=True).worst
        dp = gpus // 8
        assert dist.optimizer == pytest.approx(plain.optimizer / dp, rel=1e-12)
        assert dist.optimizer == pytest.approx(12 * dist.parameters / dp, rel=1e-12)
        # Everything else is unchanged: the fp32 grad buffer stays whole.
        assert (dist.gradients, dist.policy_weights, dist.activations) == (plain.gradients, plain.policy_weights, plain.activations)
    # Without it the optimizer does not depend on DP; with it, CP ranks share the shards too.
    assert _est(num_gpus=8).worst.optimizer == _est(num_gpus=64).worst.optimizer
    cp = _est(num_gpus=16, context_parallel_size=2, use_distributed_optimizer=True).worst
    assert cp.optimizer == pytest.approx(12 * cp.parameters / 16, rel=1e-12)


def test_sequence_and_context_parallel_cut_activations():
    no_sp = _est(tensor_model_parallel_size=4).worst.activations
    sp = _est(tensor_model_parallel_size=4, sequence_parallel=True).worst.activations
    cp2 = _est(tensor_model_parallel_size=4, sequence_parallel=True, context_parallel_size=2).worst.activations
    assert sp < no_sp and cp2 == pytest.approx(sp / 2, rel=1e-12)
    # Without flash attention each layer also keeps the softmax probabilities: 2 bytes x a/t heads x s keys
    # per token, 2 x 4096 tokens.
    local = _est(tensor_model_parallel_size=4, sequence_parallel=True, flash_attention=False).worst.activations
    assert local - sp == pytest.approx(32 * (2 * 4096) * 2 * (32 / 4) * 4096, rel=1e-12)


def test_loss_type_sets_frozen_models_and_precision_sets_bytes():
    tgdpo, dpo = _est(loss_type="tgdpo").worst, _est(loss_type="dpo").worst
    assert tgdpo.frozen_weights == 2 * dpo.frozen_weights == 2 * dpo.policy_weights
    fp32 = _est(bf16=False).worst
    assert fp32.policy_weights == 2 * dpo.policy_weights and fp32.optimizer == pytest.approx(8 * fp32.parameters)
    fp8 = _est(fp8_format="hybrid").worst
    assert fp8.policy_weights > tgdpo.policy_weights and fp8.gradients == tgdpo.gradients


def test_invalid_layouts_are_rejected():
    with pytest.raises(ValueError, match="--num-gpus 12 is not divisible by TP x PP x CP = 8 x 1 x 1"):
        _est(num_gpus=12, tensor_model_parallel_size=8)
    with pytest.raises(ValueError, match="--global-batch-size 10 is not divisible"):
        _est(num_gpus=8, global_batch_size=10)


def test_cli_table_warning_and_exit_codes(tmp_path, capsys):
    tool = load_tool("estimate_memory")
    args = ["--model", "llama3-8b", "--num-gpus", "16", "--tensor-model-parallel-size", "4", "--sequence-parallel",
            "--use-distributed-optimizer", "--bf16", "--micro-batch-size", "1", "--seq-length", "2048",
            "--global-batch-size", "128"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "TP 4 (SP) x PP 1 x CP 1 x DP 4" in out and "first & last stage" in out and "WARNING" not in out
    for label, _ in memory.ROWS:
        assert label in out

    # A Hugging Face config.json of the same model gives the same table.
    from megatron_tgdpo.convert import arch_to_hf_config

    (tmp_path / "config.json").write_text(json.dumps(arch_to_hf_config(llama.preset("llama3-8b"))))
    assert tool.main(args[2:] + ["--hf-config", str(tmp_path / "config.json")]) == 0
    hf_out = capsys.readouterr().out
    assert hf_out.splitlines()[1:] == out.splitlines()[1:]

    # 70B with TP 8 alone on 8 GPUs cannot fit: the tool says so and exits 1.
    assert tool.main(["--model", "llama3-70b", "--num-gpus", "8", "--tensor-model-parallel-size", "8", "--bf16",
                      "--global-batch-size", "8", "--micro-batch-size", "1"]) == 1
    assert "WARNING: OVER: the first & last stage needs" in capsys.readouterr().out

    assert tool.main(["--model", "llama3-8b", "--num-gpus", "6", "--tensor-model-parallel-size", "4"]) == 2
    assert "--num-gpus 6 is not divisible" in capsys.readouterr().err


def test_tight_budget_warns():
    est = _est(tensor_model_parallel_size=8, num_gpus=8)
    _, warnings = memory.format_table(est, capacity_gib=est.worst.total / GIB + 1.0, reserve_gib=4.0)
    assert len(warnings) == 1 and warnings[0].startswith("TIGHT")
