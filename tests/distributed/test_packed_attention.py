"""Packed rows (thd) through a tiny megatron-core GPTModel with the local spec equal each sequence alone.

Reference: every sequence of the packed micro-batches run alone, unpacked, on one rank (TP=1); the
loss is a fixed random weighting of each sequence's logits, summed. Each parallel layout runs the
packed rows (``PackedPreferenceCollator`` + ``packed_seq_params_for``) with the same seeded weights
and must give the same per-token logits and parameter gradients within 1e-5 (fp32): that checks the
block-diagonal mask, RoPE restarting per sequence (megatron-core's thd RoPE), and their CP split.
The boundary test changes one sequence and requires the others' logits to stay bit-identical, and
shows that this check catches a mask that leaks across sequences. Last, KV-cache decoding: queries
shorter than keys are the last rows of full causal attention.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_tgdpo.data.packing import PackedPreferenceCollator, packed_seq_params_for
from megatron_tgdpo.models import llama
from megatron_tgdpo.models.layers import ContextParallelAttention
from megatron_tgdpo.models.state_dict import gather_shards, local_full_names, seeded_init
from megatron_tgdpo.testing import run_on_ranks

ARCH = llama.preset("tiny", num_attention_heads=8, num_query_groups=4)  # GQA, TP up to 4
SEED, STD = 11, 0.05
PAD = 0
ROW = 48  # fixed row length: fits both bins at CP=2; ROW / CP divisible by TP for SP
# (prompt, chosen, rejected) lengths; bins of two pairs each -> two packed micro-batches.
LENGTHS = [(5, 6, 3), (3, 9, 2), (7, 4, 8), (2, 5, 3)]
BINS = [[0, 1], [2, 3]]


def _items() -> list[dict]:
    rng = np.random.default_rng(5)
    draw = lambda n: rng.integers(1, ARCH.vocab_size, n)  # noqa: E731 - never the pad id
    return [{"prompt": draw(p), "chosen": draw(c), "rejected": draw(r), "index": 100 + i}
            for i, (p, c, r) in enumerate(LENGTHS)]


def _sequences(bin_items: list[dict]) -> list[np.ndarray]:
    """The bin's sequences in the packed order: chosen of every pair, then rejected."""
    return [np.concatenate([it["prompt"], it[side]]) for side in ("chosen", "rejected") for it in bin_items]


def _loss_weights() -> list[list[torch.Tensor]]:
    """Per micro-batch, per sequence: [L, V] weights, scaled so gradients are O(1)."""
    g = torch.Generator().manual_seed(3)
    items = _items()
    return [[torch.randn(len(s), ARCH.vocab_size, generator=g) / ARCH.vocab_size**0.5
             for s in _sequences([items[i] for i in b])] for b in BINS]


def _batches(cp: int):
    items = _items()
    collate = PackedPreferenceCollator(pad_id=PAD, context_parallel_size=cp, fixed_length=ROW)
    return [collate([items[i] for i in b]) for b in BINS]


def _row_weights(batch, weights: list[torch.Tensor]) -> torch.Tensor:
    """[ROW, V]: each sequence's weights at its real tokens, zero on padding and the tail."""
    full = torch.zeros(batch.shape[1], ARCH.vocab_size)
    for start, w in zip(batch.segment_bounds(), weights):
        full[start : start + len(w)] = w
    return full


def _build(layout: llama.ParallelLayout):
    cfg = llama.transformer_config(ARCH, layout)
    chunks = llama.build_model(ARCH, cfg)
    seeded_init(chunks, seed=SEED, std=STD)  # the same full model at every layout
    return chunks


def _grads(chunks) -> dict[str, tuple[torch.Tensor, int, int]]:
    names = local_full_names(chunks)
    return {name: (p.grad.detach().clone(), dim, stride) for name, (p, dim, stride) in names.items()}


# --------------------------------------------------------------------------------------------
# Reference: each sequence alone, unpacked, one rank
# --------------------------------------------------------------------------------------------


def _reference():
    (model,) = _build(llama.ParallelLayout())
    items, weights = _items(), _loss_weights()
    logits, total = [], 0.0
    for b, bin_weights in zip(BINS, weights):
        per_seq = []
        for seq, w in zip(_sequences([items[i] for i in b]), bin_weights):
            ids = torch.from_numpy(seq).long()[None]
            out = model(ids, torch.arange(len(seq))[None], attention_mask=None)[0]  # [L, V]
            per_seq.append(out.detach())
            total = total + (out * w).sum() / len(BINS)
        logits.append(per_seq)
    total.backward()
    return logits, {name: g for name, (g, _, _) in _grads([model]).items()}


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(1, _reference)[0]


# --------------------------------------------------------------------------------------------
# Direct model calls: TP, TP+SP, CP, TPxCP
# --------------------------------------------------------------------------------------------


def _direct_rank(sequence_parallel: bool):
    from megatron.core import parallel_state as ps

    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    chunks = _build(llama.ParallelLayout(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                         sequence_parallel=sequence_parallel))
    shard = ARCH.vocab_size // tp
    outputs = []
    for batch, weights in zip(_batches(cp), _loss_weights()):
        local = batch.for_context_parallel(cp_rank=cp_rank, cp_size=cp)
        cols = batch.cp_positions(cp_rank=cp_rank, cp_size=cp)
        out = chunks[0](local["input_ids"], local["position_ids"], attention_mask=None,
                        packed_seq_params=packed_seq_params_for(local))[0]  # [ROW / CP, V / TP]
        w = _row_weights(batch, weights)[cols][:, tp_rank * shard : (tp_rank + 1) * shard]
        # The schedule scales a 2-tuple loss by CP / micro-batches; summing the CP ranks' parts here
        # gives the unscaled total, so divide by the micro-batch count only.
        ((out * w).sum() / len(BINS)).backward()
        outputs.append((cols, out.detach()))
    if sequence_parallel:  # what finalize_model_grads does for our RMSNorm weights
        for p in chunks[0].parameters():
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if cp > 1:  # parameters are replicated over CP: the gradient is the sum of the ranks' parts
        for p in chunks[0].parameters():
            torch.distributed.all_reduce(p.grad, group=ps.get_context_parallel_group())
    return tp_rank, cp_rank, outputs, _grads(chunks)


def _assemble_logits(results) -> list[torch.Tensor]:
    """Full-row, full-vocab logits per micro-batch from every rank's (columns, vocab shard)."""
    tp = max(r[0] for r in results) + 1
    shard = ARCH.vocab_size // tp
    full = [torch.full((ROW, ARCH.vocab_size), float("nan")) for _ in BINS]
    for tp_rank, _, outputs, _ in results:
        for mb, (cols, out) in enumerate(outputs):
            full[mb][cols, tp_rank * shard : (tp_rank + 1) * shard] = out
    return full


def _check_logits(full_rows: list[torch.Tensor], ref_logits, cp: int) -> None:
    for mb, batch in enumerate(_batches(cp)):
        for n, (start, ref) in enumerate(zip(batch.segment_bounds(), ref_logits[mb])):
            got = full_rows[mb][start : start + len(ref)]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"micro-batch {mb}, sequence {n}")


def _check_grads(stage_grads: list[dict], ref_grads: dict) -> None:
    """``stage_grads``: per rank {name: (grad shard, dim, stride)}; TP shards of a parameter are
    gathered in rank order (the ranks given are one TP group, or one per pipeline stage)."""
    by_name: dict[str, list] = {}
    for grads in stage_grads:
        for name, value in grads.items():
            by_name.setdefault(name, []).append(value)
    assert set(by_name) == set(ref_grads)
    for name, ref in ref_grads.items():
        shards = by_name[name]
        dim, stride = shards[0][1], shards[0][2]
        got = gather_shards([s[0] for s in shards], dim=dim, stride=stride) if dim >= 0 else shards[0][0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{name} gradient")


@pytest.mark.parametrize(
    "tp,cp,sequence_parallel",
    [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)],
    ids=["tp1", "tp2", "tp2-sp", "cp2", "tp2xcp2"],
)
def test_packed_matches_each_sequence_alone(reference, tp, cp, sequence_parallel):
    ref_logits, ref_grads = reference
    results = run_on_ranks(tp * cp, _direct_rank, sequence_parallel, tensor_model_parallel_size=tp,
                           context_parallel_size=cp)
    _check_logits(_assemble_logits(results), ref_logits, cp)
    # After the CP all-reduce every CP rank holds the full gradient: check the TP group of CP rank 0.
    _check_grads([r[3] for r in sorted(results, key=lambda r: r[0]) if r[1] == 0], ref_grads)


# --------------------------------------------------------------------------------------------
# Pipeline parallelism through megatron-core's schedule (one row shape for every micro-batch)
# --------------------------------------------------------------------------------------------


def _pipeline_rank(vpp):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = ps.get_pipeline_model_parallel_world_size()
    chunks = _build(llama.ParallelLayout(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp))
    batches, weights = _batches(1), _loss_weights()
    outputs = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        batch = batches[mb]
        out = model(batch["input_ids"], batch["position_ids"], attention_mask=None,
                    packed_seq_params=packed_seq_params_for(batch))

        def loss_func(output):
            outputs.append(output.detach()[0])
            return (output[0] * _row_weights(batch, weights[mb])).sum(), {}  # the schedule divides by 2

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(range(len(BINS))) for _ in chunks] if vpp else iter(range(len(BINS))),
        model=chunks,
        num_microbatches=len(BINS),
        seq_length=ROW,
        micro_batch_size=1,
        forward_only=False,
    )
    return outputs, _grads(chunks)


@pytest.mark.parametrize("vpp", [None, 2], ids=["pp2", "pp2-vpp2"])
def test_packed_pipeline_matches_each_sequence_alone(reference, vpp):
    ref_logits, ref_grads = reference
    results = run_on_ranks(2, _pipeline_rank, vpp, pipeline_model_parallel_size=2,
                           virtual_pipeline_model_parallel_size=vpp)
    _check_logits(results[-1][0], ref_logits, cp=1)
    assert not set(results[0][1]) & set(results[1][1]), "a parameter lives on two pipeline stages"
    _check_grads([results[0][1], results[1][1]], ref_grads)


# --------------------------------------------------------------------------------------------
# Sequence boundaries: no information crosses them, and the check would see it if it did
# --------------------------------------------------------------------------------------------


class _LeakyAttention(ContextParallelAttention):
    """Test-only: plain causal over the whole row, as if the segments were ignored."""

    def allowed(self, layout):  # the masked path (CP > 1)
        return layout.q_pos[:, None] >= layout.k_pos[None, :]

    def blocks(self, bounds):  # the per-segment path (CP = 1): one block over the whole row
        return [(0, bounds[-1])]


def _boundary_rank(leaky: bool):
    from megatron.core import parallel_state as ps

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    (model,) = _build(llama.ParallelLayout(context_parallel_size=cp))
    if leaky:
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.__class__ = _LeakyAttention
    batch = _batches(cp)[0]
    changed_seq = 1  # chosen of pair 1: sequences 2 and 3 follow it, sequence 0 precedes it
    start = batch.segment_bounds()[changed_seq]
    length = len(_sequences([_items()[i] for i in BINS[0]])[changed_seq])
    ids = batch["input_ids"].clone()
    g = torch.Generator().manual_seed(9)
    ids[0, start : start + length] = torch.randint(1, ARCH.vocab_size, (length,), generator=g)
    cols = batch.cp_positions(cp_rank=cp_rank, cp_size=cp)
    logits = []
    with torch.no_grad():
        for tokens in (batch["input_ids"], ids):
            local = replace(batch, tensors={**batch.tensors, "input_ids": tokens})
            local = local.for_context_parallel(cp_rank=cp_rank, cp_size=cp)
            logits.append(model(local["input_ids"], local["position_ids"], attention_mask=None,
                                packed_seq_params=packed_seq_params_for(local))[0])
    seq_of_col = batch["sequence_ids"][0, cols]
    unchanged = {}
    for n in range(batch.num_sequences):
        rows = seq_of_col == n
        unchanged[n] = bool(torch.equal(logits[0][rows], logits[1][rows]))
    return unchanged


@pytest.mark.parametrize("cp", [1, 2], ids=["cp1", "cp2"])
def test_changing_one_sequence_leaves_the_others_bit_identical(cp):
    for result in run_on_ranks(cp, _boundary_rank, False, context_parallel_size=cp):
        assert result == {0: True, 1: False, 2: True, 3: True}, result
    # The same check on a mask that ignores segments: the sequences after the changed one differ.
    for result in run_on_ranks(cp, _boundary_rank, True, context_parallel_size=cp):
        assert result[0] and not result[2] and not result[3], result


# --------------------------------------------------------------------------------------------
# RoPE restarts per sequence (megatron-core's thd RoPE, CP-aware)
# --------------------------------------------------------------------------------------------
# RoPE is relative: inside block-diagonal attention a per-sequence position offset cancels in the
# scores, so the logits above cannot tell a restarting RoPE from a continuing one (only rounding
# differs). The rotated queries can: compare the first layer's post-RoPE queries with each sequence's
# alone, and show the comparison catches continuing positions (megatron's thd RoPE takes positions
# across the whole row when max_seqlen equals the row length, rope_utils "CASE 1").


def _first_layer_queries(model, *args, **kwargs) -> torch.Tensor:
    captured = []
    attention = model.decoder.layers[0].self_attention.core_attention
    handle = attention.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].detach()))
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    return captured[0]


def _queries_rank(continuing_positions: bool):
    from megatron.core import parallel_state as ps

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    (model,) = _build(llama.ParallelLayout(context_parallel_size=cp))
    batch = _batches(cp)[0].for_context_parallel(cp_rank=cp_rank, cp_size=cp)
    params = packed_seq_params_for(batch)
    if continuing_positions:
        params = replace(params, max_seqlen_q=ROW, max_seqlen_kv=ROW)
    packed = _first_layer_queries(model, batch["input_ids"], batch["position_ids"], attention_mask=None,
                                  packed_seq_params=params)  # [ROW / CP, heads, d]
    cols = _batches(cp)[0].cp_positions(cp_rank=cp_rank, cp_size=cp)
    return cols, packed


def _alone_queries_rank():
    (model,) = _build(llama.ParallelLayout())
    sequences = _sequences([_items()[i] for i in BINS[0]])
    return [_first_layer_queries(model, torch.from_numpy(s).long()[None], torch.arange(len(s))[None],
                                 attention_mask=None)[:, 0] for s in sequences]  # [L, heads, d]


@pytest.fixture(scope="module")
def alone_queries():
    return run_on_ranks(1, _alone_queries_rank)[0]


def _max_query_error(results, alone, cp: int) -> float:
    full = torch.full((ROW, *alone[0].shape[1:]), float("nan"))
    for cols, packed in results:
        full[cols] = packed
    bounds = _batches(cp)[0].segment_bounds()
    return max((full[start : start + len(ref)] - ref).abs().max().item() for start, ref in zip(bounds, alone))


@pytest.mark.parametrize("cp", [1, 2], ids=["cp1", "cp2"])
def test_rope_restarts_per_sequence(alone_queries, cp):
    results = run_on_ranks(cp, _queries_rank, False, context_parallel_size=cp)
    assert _max_query_error(results, alone_queries, cp) < 1e-5
    continuing = run_on_ranks(cp, _queries_rank, True, context_parallel_size=cp)
    assert _max_query_error(continuing, alone_queries, cp) > 1e-2


# --------------------------------------------------------------------------------------------
# The attention alone: thd shapes, and KV-cache decoding
# --------------------------------------------------------------------------------------------


def _attention_rank():
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = llama.transformer_config(ARCH, llama.ParallelLayout())
    attn = ContextParallelAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    heads, groups, d = ARCH.num_attention_heads, ARCH.num_query_groups, ARCH.head_dim
    g = torch.Generator().manual_seed(1)
    sk, b = 12, 2
    q = torch.randn(sk, b, heads, d, generator=g)
    k = torch.randn(sk, b, groups, d, generator=g)
    v = torch.randn(sk, b, groups, d, generator=g)
    full = attn(q, k, v)  # [sk, b, heads * d]: rows, CP 1 -> the causal kernel without a mask
    from megatron_tgdpo.models.layers import _sequence_layout

    masked = attn._attend(q, k, v, attn.allowed(_sequence_layout(sq=sk, sk=sk, cp_rank=0, cp_size=1, device=q.device)))
    decode = {sq: attn(q[sk - sq :], k, v) for sq in (1, 3, sk)}  # fewer queries: the offset causal mask
    # thd: [t, heads, d] in, [t, heads * d] out; each segment equals that segment alone.
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    packed = attn(q[:, 0], k[:, 0], v[:, 0], packed_seq_params=params)
    alone = [attn(q[s:e, :1], k[s:e, :1], v[s:e, :1])[:, 0] for s, e in ((0, 5), (5, 12))]
    return full, masked, decode, packed, alone


def test_attention_thd_shapes_and_kv_cache_decoding():
    full, masked, decode, packed, alone = run_on_ranks(1, _attention_rank)[0]
    sk = full.shape[0]
    torch.testing.assert_close(full, masked, atol=1e-6, rtol=0, msg="causal kernel vs the masked square")
    for sq, out in decode.items():
        assert out.shape == (sq, *full.shape[1:])
        torch.testing.assert_close(out, full[sk - sq :], atol=1e-6, rtol=0, msg=f"{sq} new queries")
    assert packed.shape == (sk, full.shape[-1])
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# The per-segment path (CP = 1) equals the block-diagonal masked path, both of its branches
# --------------------------------------------------------------------------------------------


def _blocks_vs_mask_rank():
    from megatron_tgdpo.models.layers import _packed_layout

    cfg = llama.transformer_config(ARCH, llama.ParallelLayout())
    attention = ContextParallelAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    g = torch.Generator().manual_seed(0)
    worst = {}
    # equal lengths (one batched group) / all distinct (sliced) / mixed groups (batched, then permuted back)
    for name, bounds in (("equal", [0, 8, 16, 24, 32, 40]), ("distinct", [0, 5, 12, 20, 33, 40]),
                         ("mixed", [0, 8, 16, 24, 29, 34, 40])):
        t = bounds[-1]
        shapes = [(t, 1, attention.heads, attention.head_dim)] + 2 * [(t, 1, attention.groups, attention.head_dim)]
        inputs = [torch.randn(*shape, generator=g) for shape in shapes]
        weight = torch.randn(t, 1, attention.heads * attention.head_dim, generator=g)
        outputs, grads = [], []
        for fast in (True, False):
            q, k, v = (x.clone().requires_grad_() for x in inputs)
            if fast:
                out = attention._attend_blocks(q, k, v, attention.blocks(bounds))
            else:
                layout = _packed_layout(sq=t, sk=t, bounds=bounds, cp_rank=0, cp_size=1, device=q.device)
                out = attention._attend(q, k, v, attention.allowed(layout))
            (out * weight).sum().backward()
            outputs.append(out.detach())
            grads.append([x.grad for x in (q, k, v)])
        worst[name] = max([float((outputs[0] - outputs[1]).abs().max())]
                          + [float((a - b).abs().max()) for a, b in zip(*grads)])
    return worst


def test_per_segment_attention_equals_the_masked_square():
    (worst,) = run_on_ranks(1, _blocks_vs_mask_rank)
    assert all(value < 1e-5 for value in worst.values()), worst
