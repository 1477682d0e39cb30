"""Generation with the KV cache is exact, reproducible and layout-independent.

* Greedy generation at TP=1, TP=2 (model built with SP) and PP=2 equals the step-by-step argmax of the same model's
  full-sequence logits without a cache (checked by teacher forcing: one uncached forward over
  prompt + generated tokens; causality makes position t's logits those of the step-t prefix), and the
  returned log-probs are the uncached ones.
* A converted Hugging Face model (tiny ``LlamaForCausalLM``, random O(1) weights, ``save_pretrained``)
  generates greedily exactly what ``transformers``' ``generate(do_sample=False)`` does, stopping at EOS.
* Greedy and sampled sequences are identical at TP=1, TP=2+SP, PP=2 and PP=2 with two virtual stages.
* Sampling is reproducible from its seed, changes with it and does not depend on batch composition;
  EOS stops a sequence; ``num_samples`` sequences per prompt; DDP-wrapped chunks in train mode generate
  the same and stay in train mode.
* The sampler itself (no model): frequencies follow the distribution, top-k/top-p/vocab limits cut it.
"""
from __future__ import annotations

import io

import pytest
import torch

from megatron_tgdpo.generation import GenerationError, SamplingConfig
from megatron_tgdpo.generation.sampling import keyed_uniforms, sample_tokens
from megatron_tgdpo.testing import run_on_ranks

transformers = pytest.importorskip("transformers")

MAX_NEW = 8
TIE = 1e-4  # a cached/uncached logit difference may only flip an argmax between near-equal logits
PROMPT_LENGTHS = (5, 9, 3, 12, 7)
HF_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
SAMPLING = SamplingConfig(temperature=1.3, top_p=0.95, top_k=40, num_samples=3, return_logprobs=True)
# "tp2-sp" builds the model with sequence parallelism (generation switches it off and restores it);
# "pp2-vpp2" has two virtual stages per rank (the ring wraps between them).
LAYOUTS = {"tp1": dict(world=1), "tp2-sp": dict(world=2, tensor_model_parallel_size=2, sequence_parallel=True),
           "pp2": dict(world=2, pipeline_model_parallel_size=2),
           "pp2-vpp2": dict(world=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)}
UNCACHED_REFERENCE = ("tp1", "tp2-sp", "pp2")  # megatron's interleaved schedule needs >= PP micro-batches


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, HF_CONFIG["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ---------------------------------------------------------------------------------------------
# reference: transformers
# ---------------------------------------------------------------------------------------------


def _build_hf():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, attn_implementation="eager"))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # O(1) logits: greedy choices are far from ties
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                scale = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.float().eval()


def _hf_greedy(model, prompts, eos) -> list[list[int]]:
    """``transformers`` greedy continuations, one prompt at a time (no padding), cut after ``eos``."""
    model.generation_config.eos_token_id = eos  # None: no stop id (not LlamaConfig's default 2)
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                                 eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        if eos in seq:
            seq = seq[: seq.index(eos) + 1]
        out.append(seq)
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    model = _build_hf()
    path = tmp_path_factory.mktemp("gen_hf") / "hf"
    model.save_pretrained(path, safe_serialization=True)
    prompts = _prompts()
    free = _hf_greedy(model, prompts, None)
    eos = free[0][2]  # the third token greedy emits for prompt 0: that sequence stops there (or earlier)
    return dict(path=str(path), eos=eos, ref=_hf_greedy(model, prompts, eos))


# ---------------------------------------------------------------------------------------------
# rank side
# ---------------------------------------------------------------------------------------------


def _chunks(arch=None, *, load=None, sequence_parallel: bool = False):
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource
    from megatron_tgdpo.models.state_dict import seeded_init

    layout = llama.ParallelLayout(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel)
    if load is not None:
        arch = ModelSource.of(load).arch()
    chunks = llama.build_model(arch, llama.transformer_config(arch, layout))
    if load is not None:
        ModelSource.of(load).load_into(chunks)
    else:
        seeded_init(chunks, seed=3, std=0.3)  # the same weights at every layout, peaked logits
    return chunks


def _full_logits(chunks, rows: list[list[int]]):
    """Uncached full-sequence logits [b, S, V] (TP-gathered) on the last stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp = ps.get_tensor_model_parallel_world_size()
    width = -(-max(len(r) for r in rows) // tp) * tp  # sequence parallelism splits the sequence over TP
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # right padding: causally invisible
    positions = torch.arange(width).expand_as(tokens)
    outputs = []

    def step(data_iterator, model):
        next(data_iterator)

        def loss_func(output):
            outputs.append(output.detach())
            return output.sum() * 0, {}

        return model(tokens, positions, attention_mask=None), loss_func

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=chunks,
                                    num_microbatches=1, seq_length=width, micro_batch_size=len(rows),
                                    forward_only=True)
    if not outputs:
        return None
    shards = [torch.empty_like(outputs[0]) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, outputs[0].contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def _rank_main(hf_path: str, hf_eos: int, layout: str) -> bytes:
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.generation import generate
    from megatron_tgdpo.models import llama

    sequence_parallel = LAYOUTS[layout].get("sequence_parallel", False)
    chunks = _chunks(llama.preset("tiny"), sequence_parallel=sequence_parallel)
    prompts = _prompts()
    greedy = SamplingConfig(temperature=0.0, return_logprobs=True)
    out = {"last_stage": ps.is_pipeline_last_stage(ignore_virtual=True)}

    def run(sampling=greedy, *, eos=(), seed=0, batch=3, keys=None, which=None):
        seqs = generate(chunks, prompts if which is None else [prompts[i] for i in which], sampling=sampling,
                        eos_ids=eos, max_new_tokens=MAX_NEW, seed=seed, micro_batch_size=batch, prompt_keys=keys)
        return [(s.prompt_index, s.sample_index, s.tokens, s.finish_reason, s.logprobs) for s in seqs]

    out["greedy"] = run()
    if layout in UNCACHED_REFERENCE:
        out["full_logits"] = _full_logits(chunks, [prompts[i] + seq[2] for i, seq in enumerate(out["greedy"])])
    out["sampled"] = run(SAMPLING, seed=7)
    out["sequence_parallel_restored"] = chunks[0].config.sequence_parallel == sequence_parallel
    if layout == "tp1":  # layout-independent properties: checked once
        out["greedy_batch1"] = run(batch=1)
        out["eos"] = out["greedy"][0][2][2]
        out["greedy_eos"] = run(eos=[out["eos"]])
        out["sampled_again"] = run(SAMPLING, seed=7, batch=5)
        out["sampled_other_seed"] = run(SAMPLING, seed=8)
        # Prompts 3 and 1 alone, keyed by their index in the full list: the same samples as in the big batch.
        out["sampled_subset"] = run(SAMPLING, seed=7, batch=1, which=[3, 1], keys=[3, 1])
        try:
            run(SamplingConfig(num_samples=0))
        except GenerationError as exc:
            out["bad_config"] = str(exc)
        # As inside a training loop: DDP-wrapped chunks in train mode; generation leaves them in train mode.
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        wrapped = [DistributedDataParallel(config=c.config, ddp_config=DistributedDataParallelConfig(), module=c)
                   for c in chunks]
        for w in wrapped:
            w.train()
        out["greedy_ddp"] = [s.tokens for s in generate(wrapped, prompts, sampling=greedy, eos_ids=(),
                                                        max_new_tokens=MAX_NEW, seed=0, micro_batch_size=3)]
        out["train_mode_restored"] = all(m.training for w in wrapped for m in w.modules())

    hf_chunks = _chunks(load=hf_path)
    out["hf"] = [s.tokens for s in generate(hf_chunks, prompts, sampling=greedy, eos_ids=[hf_eos],
                                            max_new_tokens=MAX_NEW, seed=0, micro_batch_size=4)]
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runs(hf_model):
    cache = {}

    def get(layout: str) -> list[dict]:
        if layout not in cache:
            kw = dict(LAYOUTS[layout])
            world = kw.pop("world")
            kw.pop("sequence_parallel", None)
            packed = run_on_ranks(world, _rank_main, hf_model["path"], hf_model["eos"], layout, **kw)
            cache[layout] = [torch.load(io.BytesIO(p), weights_only=False) for p in packed]
        return cache[layout]

    return get


def _last_stage(results: list[dict]) -> dict:
    return next(r for r in results if r["last_stage"])


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", UNCACHED_REFERENCE)
def test_greedy_equals_argmax_of_uncached_logits(runs, layout):
    results = runs(layout)
    ref = _last_stage(results)
    prompts = _prompts()
    for r in results:  # every rank returns the same sequences
        assert r["greedy"] == results[0]["greedy"], "ranks disagree"
    for i, (_, _, tokens, reason, logprobs) in enumerate(ref["greedy"]):
        assert reason == "length" and len(tokens) == MAX_NEW
        logits = ref["full_logits"][i].float()
        for t, token in enumerate(tokens):
            row = logits[len(prompts[i]) - 1 + t]
            best = int(row.argmax())
            if token != best:
                gap = (row[best] - row[token]).item()
                assert gap < TIE, f"{layout} prompt {i} step {t}: generated {token}, argmax {best} (gap {gap:.2e})"
            want = torch.log_softmax(row, dim=-1)[token].item()
            assert abs(logprobs[t] - want) < 1e-4, f"{layout} prompt {i} step {t}: log-prob {logprobs[t]} vs {want}"


def test_greedy_does_not_depend_on_batch_composition(runs):
    ref = _last_stage(runs("tp1"))
    assert [s[2] for s in ref["greedy_batch1"]] == [s[2] for s in ref["greedy"]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_of_converted_hf_model_equals_transformers(runs, hf_model, layout):
    for r in runs(layout):
        assert r["hf"] == hf_model["ref"], f"{layout}: megatron {r['hf']} vs transformers {hf_model['ref']}"
    first = hf_model["ref"][0]
    assert len(first) <= 3 and first[-1] == hf_model["eos"], "the reference did not stop at EOS"


def test_eos_stops_a_sequence(runs):
    r = _last_stage(runs("tp1"))
    eos = r["eos"]
    for (_, _, free, _, _), (_, _, stopped, reason, logprobs) in zip(r["greedy"], r["greedy_eos"]):
        if eos in free:
            cut = free.index(eos) + 1
            assert stopped == free[:cut] and reason == "eos" and len(logprobs) == cut
        else:
            assert stopped == free and reason == "length"
    assert r["greedy_eos"][0][3] == "eos" and len(r["greedy_eos"][0][2]) <= 3


def test_sampling_is_reproducible_and_batch_independent(runs):
    r = _last_stage(runs("tp1"))
    sampled = r["sampled"]
    assert len(sampled) == len(PROMPT_LENGTHS) * SAMPLING.num_samples
    assert [(s[0], s[1]) for s in sampled] == [(i, j) for i in range(len(PROMPT_LENGTHS))
                                               for j in range(SAMPLING.num_samples)]
    assert all(len(s[2]) == MAX_NEW and s[3] == "length" and len(s[4]) == MAX_NEW for s in sampled)
    _assert_same_samples(r["sampled_again"], sampled, "same seed, other batch size")
    assert [s[2] for s in r["sampled_other_seed"]] != [s[2] for s in sampled]
    # Samples of one prompt differ from each other (3 x 8 tokens at temperature 1.3).
    assert len({tuple(s[2]) for s in sampled[:3]}) == 3
    subset = {(s[0], s[1]): s[2] for s in r["sampled_subset"]}
    assert [subset[(0, j)] for j in range(3)] == [sampled[3 * 3 + j][2] for j in range(3)]
    assert [subset[(1, j)] for j in range(3)] == [sampled[1 * 3 + j][2] for j in range(3)]


def _assert_same_samples(got, want, what: str) -> None:
    """Same sequences token for token; log-probs equal up to float reassociation."""
    assert [s[:4] for s in got] == [s[:4] for s in want], f"{what}: different samples"
    for a, b in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a[4], b[4])) < 1e-4, f"{what}: log-probs differ"


@pytest.mark.parametrize("layout", ["tp2-sp", "pp2", "pp2-vpp2"])
def test_greedy_and_sampling_are_identical_across_layouts(runs, layout):
    base = _last_stage(runs("tp1"))
    for r in runs(layout):
        assert [s[2] for s in r["greedy"]] == [s[2] for s in base["greedy"]], f"{layout}: greedy differs from TP=1"
        _assert_same_samples(r["sampled"], base["sampled"], f"{layout} vs TP=1")
        assert r["sequence_parallel_restored"]


def test_ddp_wrapped_training_chunks_generate_the_same(runs):
    r = runs("tp1")[0]
    assert r["greedy_ddp"] == [s[2] for s in r["greedy"]]
    assert r["train_mode_restored"]


def test_bad_settings_are_refused(runs):
    assert "--num-samples 0: must be >= 1" in runs("tp1")[0]["bad_config"]


# ---------------------------------------------------------------------------------------------
# the sampler alone
# ---------------------------------------------------------------------------------------------


def _draw(logits: torch.Tensor, sampling: SamplingConfig, n: int = 4000, **kw) -> torch.Tensor:
    u = keyed_uniforms(seed=1, prompt_keys=range(n), sample_indices=[0] * n, steps=[0] * n)
    return sample_tokens(logits.expand(n, -1), u, sampling, **kw)


def test_sampler_follows_the_distribution_and_its_cuts():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    counts = torch.bincount(_draw(logits, SamplingConfig()), minlength=5).double() / 4000
    assert (counts - torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])).abs().max() < 0.03
    assert set(_draw(logits, SamplingConfig(top_k=2)).tolist()) == {0, 1}
    assert set(_draw(logits, SamplingConfig(top_p=0.6)).tolist()) == {0, 1}  # 0.5 < 0.6: token 1 is needed
    assert set(_draw(logits, SamplingConfig(top_p=0.5)).tolist()) == {0}
    assert set(_draw(logits, SamplingConfig(), vocab_limit=2).tolist()) == {0, 1}
    assert set(_draw(logits, SamplingConfig(temperature=0.0)).tolist()) == {0}
    tied = torch.tensor([[1.0, 3.0, 3.0]])
    assert set(_draw(tied, SamplingConfig(temperature=0.0), n=4).tolist()) == {1}  # ties: lower id
    # Low temperature concentrates, high temperature flattens.
    assert (_draw(logits, SamplingConfig(temperature=0.2)) == 0).double().mean() > 0.95
    assert (_draw(logits, SamplingConfig(temperature=5.0)) == 0).double().mean() < 0.3


def test_uniforms_are_keyed_not_stateful():
    a = keyed_uniforms(seed=3, prompt_keys=[0, 1, 2], sample_indices=[0, 0, 1], steps=[4, 4, 4])
    b = keyed_uniforms(seed=3, prompt_keys=[2, 0], sample_indices=[1, 0], steps=[4, 4])
    assert a[2] == b[0] and a[0] == b[1]
    assert len(set(a.tolist())) == 3 and ((a >= 0) & (a < 1)).all()
    assert keyed_uniforms(seed=4, prompt_keys=[0], sample_indices=[0], steps=[4])[0] != a[0]
