"""Converted Hugging Face Llama checkpoints compute the same log-probs in megatron as in ``transformers``.

Reference: ``transformers.LlamaForCausalLM`` (fp32) built from tiny configs with random weights, saved with
``save_pretrained``. Each checkpoint is loaded two ways (our converted format, and the HF directory
converted on the fly) at TP=1, TP=2 and PP=2, and per-token log-probs must match within 1e-4.

Weights are drawn with O(1) attention logits (not the 0.02 init, under which attention is nearly
uniform and a wrong RoPE would go unnoticed); two controls show the comparison is sensitive to the
RoPE convention and to the llama3 frequency scaling. Export: torch_dist checkpoints saved at TP=2 and
PP=2 go back to HF and must reproduce the trained model's weights bit for bit and its log-probs in
``transformers``.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_tgdpo import convert  # noqa: E402
from megatron_tgdpo.testing import run_on_ranks  # noqa: E402

B, S, TOL = 2, 160, 1e-4
LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8, vocab_size=256)
CASES = {
    # Llama 3.1 style: GQA (2 query heads per KV head), theta 500000, llama3 RoPE scaling, untied.
    "llama3.1": dict(COMMON, num_key_value_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling=dict(LLAMA3_SCALING, factor=8.0), rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama 3.2 style: tied embeddings, 4 query heads per KV head, factor 32, stored in bf16.
    "llama3.2-tied": dict(COMMON, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=131072,
                          rope_scaling=dict(LLAMA3_SCALING, factor=32.0), rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Llama 2 style: multi-head attention (no num_key_value_heads), theta 10000, no scaling.
    "llama2": dict(COMMON, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
                   tie_word_embeddings=False),
}
BF16 = {"llama3.2-tied"}


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, COMMON["vocab_size"], (B, S), generator=g)
    labels = torch.randint(0, COMMON["vocab_size"], (B, S), generator=g)
    return tokens, labels


def _logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _randomize(model) -> None:
    """Weights with O(1) activations and attention logits; norm weights away from 1."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _hf_logprobs(model) -> torch.Tensor:
    tokens, labels = _batch()
    with torch.no_grad():
        return _logprobs(model(input_ids=tokens).logits, labels)


def _build_hf(name: str, config: dict):
    cfg = transformers.LlamaConfig(**config, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    _randomize(model)
    if name in BF16:  # the fp32 reference uses exactly the stored bf16 values
        # (rounding parameters only: ``model.to(bfloat16)`` would also round the RoPE inv_freq buffer)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_parity")
    out = {}
    for name, config in CASES.items():
        model = _build_hf(name, config)
        hf_dir = root / name / "hf"
        stored = copy.deepcopy(model).to(torch.bfloat16) if name in BF16 else model
        stored.save_pretrained(hf_dir, safe_serialization=True)
        converted = convert.hf_to_megatron(hf_dir, root / name / "converted")
        no_scaling = None
        if "rope_scaling" in config:  # control: the same weights without the llama3 frequency scaling
            plain = transformers.LlamaForCausalLM(
                transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "rope_scaling"},
                                         attn_implementation="eager")).eval()
            plain.load_state_dict(model.state_dict())
            no_scaling = _hf_logprobs(plain)
        out[name] = dict(hf=hf_dir, converted=converted, ref=_hf_logprobs(model), no_scaling=no_scaling)
    return out


# ---------------------------------------------------------------------------------------------
# rank side
# ---------------------------------------------------------------------------------------------


def _layout():
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models import llama

    return llama.ParallelLayout(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )


def _forward(chunks, tokens):
    """Vocab-sharded logits of the last pipeline stage (None on other stages)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return chunks[0](tokens, positions, attention_mask=None)
    outputs = []

    def step(data_iterator, model):
        next(data_iterator)

        def loss_func(output):
            outputs.append(output.detach())
            return output.sum() * 0, {}

        return model(tokens, positions, attention_mask=None), loss_func

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([0]), model=chunks, num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
    )
    return outputs[0] if outputs else None


def _build_and_load(path):
    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource

    arch = convert.checkpoint_arch(path)
    chunks = llama.build_model(arch, llama.transformer_config(arch, _layout()))
    ModelSource.of(path).load_into(chunks)  # the trainer's entry point; dispatches to convert
    for c in chunks:
        c.eval()
    return chunks


def _interleave_qk_(chunk, arch) -> None:
    """Control: reorder q/k rows as a converter that assumed interleaved RoPE pairs would."""
    hd, groups = arch.head_dim, arch.num_query_groups
    per_group = arch.num_attention_heads // groups + 2  # q heads, k, v
    perm_head = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # halves -> interleaved pairs
    for layer in chunk.decoder.layers:
        w = layer.self_attention.linear_qkv.weight
        with torch.no_grad():
            heads = w.view(groups, per_group, hd, -1)
            heads[:, :-1] = heads[:, :-1, perm_head].clone()  # q heads and k, not v


def _mismatch_errors(path) -> dict:
    """Loading into a model built for another architecture must fail, naming the difference."""
    import dataclasses

    from megatron_tgdpo.models import llama

    arch = convert.checkpoint_arch(path)
    errors = {}
    for field, value in [("rope_scaling_factor", None), ("rope_theta", 10000.0), ("num_query_groups", 8),
                         ("tie_word_embeddings", True)]:
        wrong = dataclasses.replace(arch, **{field: value})
        try:
            convert.load_into_model(path, llama.build_model(wrong, llama.transformer_config(wrong, _layout())))
            errors[field] = None
        except convert.ConversionError as exc:
            errors[field] = str(exc)
    return errors


def _rank_logprobs(jobs, with_controls: bool) -> dict:
    tokens, _ = _batch()
    out = {}
    for key, path in jobs:
        chunks = _build_and_load(path)
        out[key] = _forward(chunks, tokens)
        if with_controls and key == ("llama3.1", "converted"):
            _interleave_qk_(chunks[0], convert.checkpoint_arch(path))
            out["interleaved"] = _forward(chunks, tokens)
            out["mismatch"] = _mismatch_errors(path)
    return out


def _gathered(results, key) -> torch.Tensor:
    shards = [r[key] for r in results if r.get(key) is not None]
    return torch.cat(shards, dim=-1)  # TP ranks in order; with PP only the last stage has logits


LAYOUTS = {"tp1": dict(world=1), "tp2": dict(world=2, tensor_model_parallel_size=2),
           "pp2": dict(world=2, pipeline_model_parallel_size=2)}
SAVED = {"tp2": "llama3.1", "pp2": "llama3.2-tied"}  # torch_dist checkpoints exported back to HF


def _rank_main(jobs, with_controls: bool, save_from, save_root) -> bytes:
    out = _rank_logprobs(jobs, with_controls)
    if save_from is not None:
        out["saved"] = _train_step_and_save(save_from, save_root)
    # Serialised by value: once torch.multiprocessing is imported, tensors sent through a Pipe travel
    # as shared-memory handles that the parent fetches from this rank, which may have exited by then.
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """One multi-rank run per layout (forking ranks dominates the cost), shared by the tests below."""
    cache = {}

    def get(layout: str) -> list[dict]:
        if layout not in cache:
            kw = dict(LAYOUTS[layout])
            world = kw.pop("world")
            jobs = [((name, src), str(ck[src])) for name, ck in checkpoints.items() for src in ("converted", "hf")]
            save_from = str(checkpoints[SAVED[layout]]["converted"]) if layout in SAVED else None
            save_root = str(tmp_path_factory.mktemp(f"save_{layout}")) if layout in SAVED else None
            packed = run_on_ranks(world, _rank_main, jobs, layout == "tp1", save_from, save_root, **kw)
            cache[layout] = [torch.load(io.BytesIO(p), weights_only=False) for p in packed]
            cache[layout + ":root"] = save_root
        return cache[layout]

    get.save_root = lambda layout: Path(cache[layout + ":root"])
    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logprobs_match_transformers(checkpoints, runs, layout):
    results = runs(layout)
    _, labels = _batch()
    for name in CASES:
        for src in ("converted", "hf"):
            got = _logprobs(_gathered(results, (name, src)), labels)
            err = (got - checkpoints[name]["ref"]).abs().max().item()
            assert err < TOL, f"{layout} {name} loaded from {src}: max |log-prob difference| {err:.2e}"


def test_the_comparison_catches_rope_convention_and_scaling_bugs(checkpoints, runs):
    """Controls: each must be far outside the tolerance, or the parity test could not catch that bug."""
    _, labels = _batch()
    ref = checkpoints["llama3.1"]["ref"]
    wrong_rope = (_logprobs(_gathered(runs("tp1"), "interleaved"), labels) - ref).abs().max().item()
    assert wrong_rope > 100 * TOL, f"interleaved-RoPE control differs by only {wrong_rope:.2e}"
    for name, ck in checkpoints.items():
        if ck["no_scaling"] is not None:
            gap = (ck["no_scaling"] - ck["ref"]).abs().max().item()
            assert gap > 100 * TOL, f"{name}: llama3 scaling changes log-probs by only {gap:.2e}"


def test_loading_into_a_model_of_another_architecture_is_refused(runs):
    errors = runs("tp1")[0]["mismatch"]
    expected = {"rope_scaling_factor": "rope_scaling: model False vs checkpoint True",
                "rope_theta": "rope_theta: model 10000 vs checkpoint 500000",
                "num_query_groups": "num_query_groups: model 8 vs checkpoint 4",
                "tie_word_embeddings": "tie_word_embeddings: model True vs checkpoint False"}
    for field, text in expected.items():
        assert errors[field] is not None and text in errors[field], (field, errors[field])


# ---------------------------------------------------------------------------------------------
# torch_dist (saved at TP=2 / PP=2) -> Hugging Face
# ---------------------------------------------------------------------------------------------


def _train_step_and_save(path, root):
    """Load, perturb every weight (a stand-in for training), save torch_dist; return full weights + logits."""
    from megatron.core import parallel_state as ps

    from megatron_tgdpo import checkpointing
    from megatron_tgdpo.models.state_dict import local_full_names, shard_tensor

    chunks = _build_and_load(path)
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    full = {}
    tied = convert.checkpoint_arch(path).tie_word_embeddings
    for name, (param, dim, stride) in sorted(local_full_names(chunks).items()):
        # The last stage's copy of a tied embedding gets the same update as the embedding, as in training.
        seed_name = "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name
        g = torch.Generator().manual_seed(1000 + sum(map(ord, seed_name)))
        full_shape = list(param.shape)
        if dim >= 0:
            full_shape[dim] *= size
        noise = 0.05 * torch.randn(full_shape, generator=g)
        base = param.detach().clone()
        with torch.no_grad():
            param.add_(shard_tensor(noise, dim=dim, stride=stride, rank=rank, size=size) if dim >= 0 else noise)
        full[name] = (param.detach().clone(), dim, stride, base)
    # The tp2 run records the model's config.json in the checkpoint metadata (what a trainer that loaded
    # an HF/converted model can do), so the export needs no --hf-config; the pp2 run does not.
    from megatron_tgdpo.convert.converted import read_metadata

    state = {"hf_config": read_metadata(path)["hf_config"]} if size > 1 else None
    checkpointing.save_checkpoint(root, iteration=5, parts={"policy": checkpointing.CheckpointPart(chunks)},
                                  state=state)
    tokens, _ = _batch()
    return full, _forward(chunks, tokens)


@pytest.mark.parametrize("layout", list(SAVED))
def test_torch_dist_checkpoint_exports_to_hf(checkpoints, runs, tmp_path, layout):
    from safetensors.torch import load_file

    from megatron_tgdpo.models.state_dict import gather_shards

    results = [r["saved"] for r in runs(layout)]
    ck = checkpoints[SAVED[layout]]
    # tp2: config recorded in the checkpoint; pp2: --hf-config given as the converted directory.
    exported = convert.megatron_to_hf(runs.save_root(layout), tmp_path / "hf",
                                      hf_config=None if layout == "tp2" else ck["converted"])
    # The original config, with its dtype entry updated to what was stored (the model trained in fp32).
    config = json.loads((ck["hf"] / "config.json").read_text())
    assert json.loads((exported / "config.json").read_text()) == dict(config, dtype="float32")

    # Bit for bit: re-import the export and compare with the trained model's gathered weights.
    reimported = convert.hf_to_megatron(exported, tmp_path / "reimported")
    stored = {}
    for file in reimported.glob("*.safetensors"):
        stored.update(load_file(file))
    for n in {n for r in results for n in r[0]}:
        shards = [r[0][n] for r in results if n in r[0]]
        _, dim, stride, _ = shards[0]
        tp_sharded = dim >= 0 and len(shards) > 1
        want = gather_shards([s[0] for s in shards], dim=dim, stride=stride) if tp_sharded else shards[0][0]
        key = "embedding.word_embeddings.weight" if n == "output_layer.weight" and n not in stored else n
        assert torch.equal(stored[key], want), f"{n} differs after torch_dist -> HF"
    assert all(not torch.equal(s[0], s[3]) for r in results for s in r[0].values()), "perturbation was a no-op"

    # And transformers computes the trained model's log-probs from the export.
    model = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32, attn_implementation="eager")
    _, labels = _batch()
    megatron_lp = _logprobs(_gathered([{"x": r[1]} for r in results], "x"), labels)
    err = (_hf_logprobs(model.eval()) - megatron_lp).abs().max().item()
    assert err < TOL, f"exported model's log-probs differ by {err:.2e}"
