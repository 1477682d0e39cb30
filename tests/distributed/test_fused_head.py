"""The fused LM head on a tiny megatron-core GPTModel under DDP matches the plain head.

One model per layout, wrapped in megatron-core ``DistributedDataParallel`` (``grad_reduce_in_fp32``,
``overlap_grad_reduce=False``, as the trainer) and driven by megatron's pipeline schedule with
``finalize_model_grads``: first with the normal head (logits -> ``vocab_parallel_logprobs``), then, on
the same weights, with :func:`enable_fused_head` (hidden states -> :func:`fused_logprobs`). The loss is
the sum of masked token log-probs. Compared: every token log-prob and every parameter's ``main_grad``.

fp32 tolerances: log-probs 1e-5 absolute; ``main_grad`` 1e-5 relative to the largest entry of that
parameter's gradient (the two heads differ only in GEMM blocking, ~1e-7). The bf16 case allows a few
bf16 roundings (the logits and every activation gradient are rounded to bf16 on both paths, in GEMMs of
different shapes).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_tgdpo.models import llama
from megatron_tgdpo.testing import run_on_ranks

B, S, N_MICRO = 2, 16, 3
CHUNK = 5  # tokens per fused chunk: 32 tokens per micro-batch -> several forward chunks and vocab blocks


def _microbatches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for n in range(N_MICRO):
        out.append(dict(
            input_ids=torch.randint(0, vocab, (B, S), generator=g),
            position_ids=torch.arange(S).expand(B, S),
            labels=torch.randint(0, vocab, (B, S), generator=g),
            # the last micro-batch trains nothing (a filler micro-batch): the head must still backpropagate
            loss_mask=(torch.rand(B, S, generator=g) < 0.7).float() * (n < N_MICRO - 1),
        ))
    return out


def _context_parallel_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models.layers import cp_chunk_positions

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return batch
    idx = cp_chunk_positions(local_len=S // cp, cp_rank=ps.get_context_parallel_rank(), cp_size=cp,
                             device=torch.device("cpu"))
    return {k: v[:, idx] for k, v in batch.items()}


def _run(ddp_chunks, batches, *, fused: bool, forward_only: bool = False, at_loss_positions: bool = False):
    """One schedule pass; (log-probs per micro-batch on the last stage, main_grad per parameter name,
    names of parameters left with a .grad, shapes of the model outputs). ``at_loss_positions``: the head
    is given the trained positions (this rank's ``loss_mask``), as the trainer's batches give them."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_tgdpo.models.fused_head import fused_logprobs
    from megatron_tgdpo.ops import vocab_parallel_logprobs

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    logps_out, shapes = [], []

    def forward_step(data_iterator, model):
        batch = _context_parallel_slice(batches[next(data_iterator)])
        output = model(batch["input_ids"], batch["position_ids"], attention_mask=None)

        def loss_func(output):
            shapes.append(tuple(output.shape))
            if fused:
                positions = batch["loss_mask"].reshape(-1).nonzero().reshape(-1) if at_loss_positions else None
                logps = fused_logprobs(model, output, batch["labels"], chunk_size=CHUNK, positions=positions)
            else:
                logps = vocab_parallel_logprobs(output, batch["labels"])
            logps_out.append(logps.detach().clone())
            return (logps * batch["loss_mask"]).sum(), {}

        return output, loss_func

    with torch.no_grad() if forward_only else torch.enable_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(range(N_MICRO)),
            model=ddp_chunks,
            num_microbatches=N_MICRO,
            seq_length=S,
            micro_batch_size=B,
            forward_only=forward_only,
        )
    grads, stray = {}, []
    for chunk in ddp_chunks:
        for name, p in chunk.module.named_parameters():
            grads[name] = p.main_grad.detach().clone()
            if p.grad is not None:
                stray.append(name)
    return logps_out, grads, stray, shapes


def _fused_vs_plain(*, tied: bool, bf16: bool, layout: dict):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_tgdpo.models.fused_head import enable_fused_head, is_fused_head_enabled, output_weight

    arch = dataclasses.replace(llama.preset("tiny"), tie_word_embeddings=tied)
    cfg = llama.transformer_config(arch, llama.ParallelLayout(**layout), llama.Precision(bf16=bf16))
    chunks = llama.build_model(arch, cfg)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    ddp = [DistributedDataParallel(config=cfg, ddp_config=ddp_config, module=c) for c in chunks]
    cfg.finalize_model_grads_func = finalize_model_grads
    batches = _microbatches(arch.vocab_size)

    plain_logps, plain_grads, plain_stray, plain_shapes = _run(ddp, batches, fused=False)
    keys_before = [list(c.state_dict().keys()) for c in chunks]
    for chunk in ddp:
        enable_fused_head(chunk)
    keys_after = [list(c.state_dict().keys()) for c in chunks]
    fused_logps, fused_grads, fused_stray, fused_shapes = _run(ddp, batches, fused=True)
    scored, _, _, _ = _run(ddp, batches, fused=True, forward_only=True)
    at_positions = _run(ddp, batches, fused=True, at_loss_positions=True)
    masks = [_context_parallel_slice(b)["loss_mask"] for b in batches]

    last = chunks[-1].post_process
    tied_weight = None
    if tied and last:
        tied_weight = output_weight(ddp[-1]).main_grad.detach().clone()
    embedding = None
    if chunks[0].pre_process:
        embedding = chunks[0].embedding.word_embeddings.weight.main_grad.detach().clone()
    return dict(
        last=last,
        enabled=[is_fused_head_enabled(c) for c in ddp],
        plain=(plain_logps, plain_grads, plain_stray, plain_shapes),
        fused=(fused_logps, fused_grads, fused_stray, fused_shapes),
        scored=scored,
        at_positions=at_positions,
        masks=masks,
        keys_unchanged=keys_before == keys_after,
        tied_weight=tied_weight,
        embedding=embedding,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
    )


CASES = {
    "tp1": (1, dict(tied=False, bf16=False, layout={})),
    "tp1-tied": (1, dict(tied=True, bf16=False, layout={})),
    "tp2": (2, dict(tied=False, bf16=False, layout=dict(tensor_model_parallel_size=2))),
    "tp2-sp-tied": (2, dict(tied=True, bf16=False, layout=dict(tensor_model_parallel_size=2, sequence_parallel=True))),
    "cp2": (2, dict(tied=False, bf16=False, layout=dict(context_parallel_size=2))),
    "pp2-tied": (2, dict(tied=True, bf16=False, layout=dict(pipeline_model_parallel_size=2))),
    "tp2-sp-bf16": (2, dict(tied=False, bf16=True, layout=dict(tensor_model_parallel_size=2, sequence_parallel=True))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_head_matches_plain_head(case):
    world, kwargs = CASES[case]
    layout = kwargs["layout"]
    results = run_on_ranks(
        world, _fused_vs_plain, **kwargs,
        tensor_model_parallel_size=layout.get("tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=layout.get("pipeline_model_parallel_size", 1),
        context_parallel_size=layout.get("context_parallel_size", 1),
    )
    bf16 = kwargs["bf16"]
    logp_tol, grad_rel = (3e-2, 3e-2) if bf16 else (1e-5, 1e-5)
    hidden = llama.preset("tiny").hidden_size
    for rank, res in enumerate(results):
        assert res["keys_unchanged"], rank
        plain_logps, plain_grads, plain_stray, plain_shapes = res["plain"]
        fused_logps, fused_grads, fused_stray, fused_shapes = res["fused"]
        # DDP's hook moved every autograd gradient into main_grad; the fused head left none behind.
        assert plain_stray == [] and fused_stray == [], (rank, plain_stray, fused_stray)
        if res["last"]:
            assert res["enabled"][-1]
            assert len(fused_logps) == N_MICRO
            # The fused model returned hidden states ([b, s(/tp with SP), H]), never logits.
            assert all(shape[-1] == hidden for shape in fused_shapes), fused_shapes
            assert all(shape[-1] != hidden for shape in plain_shapes), plain_shapes
            for plain, fused, scored, only, mask in zip(plain_logps, fused_logps, res["scored"],
                                                         res["at_positions"][0], res["masks"]):
                assert fused.dtype == torch.float32 and fused.shape == plain.shape
                assert (fused - plain).abs().max().item() < logp_tol, rank
                torch.testing.assert_close(scored, fused, rtol=0, atol=0)  # forward-only: same numbers
                # Only at the trained positions: the same log-probs there, exactly 0 elsewhere.
                assert only.shape == plain.shape
                assert ((only - plain) * mask).abs().max().item() < logp_tol, rank
                assert torch.count_nonzero(only * (mask == 0)) == 0, rank
        else:
            assert fused_logps == [] and not any(res["enabled"])
        assert set(plain_grads) == set(fused_grads) == set(res["at_positions"][1])
        assert res["at_positions"][2] == [], rank
        for name, plain in plain_grads.items():
            scale = plain.abs().max().item()
            for what, grads in (("fused", fused_grads), ("fused at the loss positions", res["at_positions"][1])):
                err = (grads[name] - plain).abs().max().item()
                assert err <= grad_rel * scale + 1e-12, \
                    f"rank {rank} {name} ({what}): |diff| {err:.3g} vs max |grad| {scale:.3g}"
            assert scale > 0 or name.endswith("bias"), f"rank {rank} {name}: no gradient at all"
    if case == "pp2-tied":
        # finalize_model_grads all-reduced the last stage's copy of the tied weight with the embedding.
        first = next(r for r in results if r["pp_rank"] == 0)
        last = next(r for r in results if r["last"])
        torch.testing.assert_close(last["tied_weight"], first["embedding"], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def _guards():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_tgdpo.models.fused_head import (
        disable_fused_head, enable_fused_head, fused_logprobs, is_fused_head_enabled, output_logprobs, output_weight,
    )

    arch = llama.preset("tiny")
    cfg = llama.transformer_config(arch, llama.ParallelLayout())
    model = llama.build_model(arch, cfg)[0]
    out = {}
    batch = _microbatches(arch.vocab_size)[0]
    logits = model(batch["input_ids"], batch["position_ids"], attention_mask=None)
    try:
        fused_logprobs(model, logits, batch["labels"])
    except ValueError as exc:
        out["not_enabled"] = str(exc)
    enable_fused_head(model)
    enable_fused_head(model)  # idempotent
    out["enabled"] = is_fused_head_enabled(model)
    out["weight_is_output_layer"] = output_weight(model) is model.output_layer.weight
    hidden = model(batch["input_ids"], batch["position_ids"], attention_mask=None)
    out["hidden_shape"] = tuple(hidden.shape)
    fused = output_logprobs(model, hidden, batch["labels"], chunk_size=7)
    try:
        model.output_layer(hidden.transpose(0, 1), runtime_gather_output=True)
    except RuntimeError as exc:
        out["gather"] = str(exc)
    disable_fused_head(model)
    out["disabled"] = not is_fused_head_enabled(model)
    plain = output_logprobs(model, model(batch["input_ids"], batch["position_ids"], attention_mask=None),
                           batch["labels"], chunk_size="auto")
    out["dispatch_err"] = (fused - plain).abs().max().item()
    overlap = DistributedDataParallel(
        config=cfg, ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=True), module=model
    )
    try:
        enable_fused_head(overlap)
    except NotImplementedError as exc:
        out["overlap"] = str(exc)
    return out


def test_guards_and_toggling():
    res = run_on_ranks(1, _guards)[0]
    assert "enable_fused_head" in res["not_enabled"]
    assert res["enabled"] and res["weight_is_output_layer"] and res["disabled"]
    assert res["hidden_shape"] == (B, S, llama.preset("tiny").hidden_size)
    assert "disable_fused_head" in res["gather"]
    assert res["dispatch_err"] < 1e-5
    assert "overlap_grad_reduce" in res["overlap"]
