"""The memory estimate's local-layer term (megatron's local spec: every CPU run) against a hand count,
and against what a local layer really saves for backward (autograd's saved tensors, counted by storage)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tgdpo import memory
from megatron_tgdpo.models import llama
from megatron_tgdpo.testing import run_on_ranks


def test_local_layer_term_by_hand():
    tiny = llama.preset("tiny")  # h 64, f 128, 4 heads of 16
    assert (tiny.hidden_size, tiny.ffn_hidden_size, tiny.head_dim) == (64, 128, 16)
    # fp32: norms 2 x (4 x 64) = 512; attention output 4 x 64 = 256; SwiGLU 2 x 4 x 128 = 1024; RoPE 16 x 16 = 256
    assert memory.local_layer_bytes_per_token(tiny, bytes_per_element=4) == 512 + 256 + 1024 + 256
    # bf16, TP 2 with SP: norms 2 x (4 x 64 + 2 x 64) / 2 = 384; (2 x 64 + 2 x 2 x 128) / 2 = 320; RoPE 256
    assert memory.local_layer_bytes_per_token(tiny, tensor_model_parallel_size=2, sequence_parallel=True,
                                              bytes_per_element=2) == 384 + 320 + 256


def test_estimate_adds_the_term_for_every_layer_in_flight():
    arch = llama.preset("tiny")
    kwargs = dict(num_gpus=1, micro_batch_size=2, seq_length=64, bf16=False, loss_type="dpo")
    fused = memory.estimate(arch, **kwargs).worst
    local = memory.estimate(arch, local_layers=True, **kwargs).worst
    tokens = 2 * 2 * 64
    extra = arch.num_layers * tokens * memory.local_layer_bytes_per_token(arch, bytes_per_element=4)
    assert local.activations - fused.activations == pytest.approx(extra)
    assert local.total - fused.total == pytest.approx(extra)


def _saved_bytes(num_layers: int, hidden: int, ffn: int, seq: int) -> int:
    """Bytes of the distinct storages a policy forward saves for backward (parameters left out)."""
    from megatron_tgdpo.config import parse_args
    from megatron_tgdpo.runtime import setup

    arch = dataclasses.replace(llama.preset("tiny"), num_layers=num_layers, hidden_size=hidden, ffn_hidden_size=ffn)
    model = setup.build_chunks(arch, parse_args(["--model", "tiny", "--train-iters", "1"]))[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, arch.vocab_size, (2, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.arange(seq).expand(2, seq), attention_mask=None)
    return sum(seen.values())


def test_estimate_per_layer_matches_what_a_local_layer_saves():
    hidden, ffn, seq = 128, 512, 64
    one, two = run_on_ranks(1, _saved_bytes, 1, hidden, ffn, seq)[0], run_on_ranks(1, _saved_bytes, 2, hidden, ffn, seq)[0]
    measured = (two - one) / (2 * seq)  # one more layer, per token
    arch = dataclasses.replace(llama.preset("tiny"), hidden_size=hidden, ffn_hidden_size=ffn)
    fused = memory.activation_bytes_per_token_layer(arch, seq_length=seq, bytes_per_element=4)
    local = fused + memory.local_layer_bytes_per_token(arch, bytes_per_element=4)
    # Padded rows share their RoPE tables (2 rows here: the term is an upper bound by 8 x head_dim); within 5 %.
    assert 0.95 * local <= measured <= local
    assert measured > 1.3 * fused  # what the fused-layer count alone misses on this path
