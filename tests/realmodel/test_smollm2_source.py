"""SmolLM2-135M-Instruct read from its GGUF file: the same model as transformers on the dequantized
weights, at TP1 / TP3 / PP2, with the file's own tokenizer and chat template.

References: transformers' ``LlamaForCausalLM`` (fp32, eager attention) on the fp32 Hugging Face
directory ``fetch-model`` writes; transformers' tokenizer and ``apply_chat_template`` on that
directory; token ids that transformers' own GGUF tokenizer gives for the same text; and transformers'
GGUF loader's Q/K row reordering applied to the raw dequantized rows.
"""
from __future__ import annotations

import io

import pytest
import torch

from megatron_tgdpo.testing import run_on_ranks

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TOL = 1e-4  # |log-prob| difference, fp32 both sides
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort: pear, apple, fig"},
     {"role": "assistant", "content": "apple, fig, pear"}],
    [{"role": "user", "content": "2 + 3 * 4 = ?"}, {"role": "assistant", "content": "14"}],
    # Long enough (~300 tokens) that a row's causal attention runs in several query chunks on CPU
    # (compat.causal_sdpa), padding the short rows above to its width.
    [{"role": "user", "content": "Describe how bread is made, step by step."},
     {"role": "assistant", "content": (
         "First, mix flour, water, salt and yeast in a large bowl until a rough dough forms. Knead the dough "
         "on a floured table for about ten minutes, folding and pressing it until it becomes smooth and "
         "elastic. Place it in an oiled bowl, cover it with a cloth, and leave it somewhere warm for an "
         "hour or two, until it has doubled in size. Then press the air out of the dough, shape it into a "
         "loaf or a few rolls, and set it on a baking tray or in a tin. Let it rise again for forty minutes "
         "while the oven heats to a high temperature. Before baking, cut a few shallow lines across the top "
         "so that the loaf can expand evenly, and brush it with a little water or milk for a golden crust. "
         "Bake it for thirty to forty minutes, until the crust is brown and the bottom sounds hollow when "
         "you tap it. Finally, let the bread cool on a wire rack for at least half an hour before slicing, "
         "because the inside keeps cooking while the steam escapes. Stored in a paper bag, it stays fresh "
         "for two or three days, and slices can be frozen and toasted later.")}],
]


def _token_batch(hf_tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, labels, mask) of the conversations, right-padded; ids from transformers' template."""
    rows = [list(hf_tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
            for c in CONVERSATIONS]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), hf_tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row) - 1] = True
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# ---- the file itself -------------------------------------------------------------------------------


def test_architecture_tokens_and_template_come_from_the_file(smollm2, hf_tokenizer):
    from megatron_tgdpo.data.tokenizer import load_tokenizer
    from megatron_tgdpo.generation.prompts import encode_prompt
    from megatron_tgdpo.data.records import parse_prompt
    from megatron_tgdpo.models.sources import ModelSource

    source = ModelSource.of(smollm2.gguf)
    assert source.kind == "gguf" and source.is_model_directory
    arch = source.arch()
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups) == (30, 576, 9, 3)
    assert (arch.ffn_hidden_size, arch.vocab_size, arch.tie_word_embeddings) == (1536, 49152, True)
    assert arch.rope_theta == 100000.0 and arch.norm_eps == 1e-5  # float32 9.99999974e-06 read back as 1e-05

    ours = load_tokenizer(smollm2.gguf)
    assert ours.chat_template.name == "auto"
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 49152)
    # ids transformers' GGUF tokenizer gives for the same strings (digits are split one by one)
    assert ours.encode("Hello world! How are you doing today?") == [19556, 905, 17, 1073, 359, 346, 2567, 1834, 47]
    assert ours.encode("12345 and 3.14") == [33, 34, 35, 36, 37, 284, 216, 35, 30, 33, 36]
    text = "  spaced   out\n\n\ttabs émoji 🙂 <|im_start|>user"
    assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    for conversation in CONVERSATIONS:
        prompt = conversation[:-1]
        want = hf_tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
        assert encode_prompt(parse_prompt(prompt), ours) == list(want)


def test_gguf_and_hf_directory_give_identical_weights(smollm2):
    from megatron_tgdpo.convert.loader import open_for_loading

    arch_g, from_gguf = open_for_loading(smollm2.gguf)
    arch_h, from_hf = open_for_loading(smollm2.hf_dir)
    assert arch_g == arch_h and set(from_gguf) == set(from_hf)
    for name in from_gguf:
        assert torch.equal(from_gguf[name].read(), from_hf[name].read()), name


def test_qk_rows_are_reordered_as_transformers_gguf_loader_does(smollm2):
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from megatron_tgdpo.convert.gguf_source import GGUFModel

    model = GGUFModel(smollm2.gguf)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for name, hf_name in (("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                          ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight")):
        info = model.file.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = info.dims[0] // block * size
        raw = np.fromfile(smollm2.gguf, dtype=np.uint8, count=info.shape[0] * row_bytes, offset=info.offset)
        stored = gguf.quants.dequantize(raw.reshape(info.shape[0], row_bytes), qtype)
        want = torch.from_numpy(np.array(processor.process(stored, name).weights, dtype=np.float32))
        got = model.views[hf_name].read()
        assert torch.equal(got, want), name
        assert not torch.equal(got, torch.from_numpy(np.array(stored))), "the control: stored order differs"


# ---- log-probs at TP1 / TP3 / PP2 ---------------------------------------------------------------------


def _forward(chunks, tokens):
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

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=chunks, num_microbatches=1,
                                seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    return outputs[0] if outputs else None


def _rank_logits(path: str, tokens: torch.Tensor) -> bytes:
    from megatron.core import parallel_state as ps

    from megatron_tgdpo.models import llama
    from megatron_tgdpo.models.sources import ModelSource

    source = ModelSource.of(path)
    arch = source.arch()
    layout = llama.ParallelLayout(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                                  pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())
    chunks = llama.build_model(arch, llama.transformer_config(arch, layout))
    source.load_into(chunks)
    for chunk in chunks:
        chunk.eval()
    buffer = io.BytesIO()
    torch.save(_forward(chunks, tokens), buffer)  # by value: the rank may exit before the parent reads it
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(hf_model, hf_tokenizer):
    tokens, labels, mask = _token_batch(hf_tokenizer)
    with torch.no_grad():
        logits = hf_model(input_ids=tokens).logits
    return tokens, labels, mask, _logprobs(logits, labels)


@pytest.mark.parametrize("layout,source", [("tp1", "gguf"), ("tp3", "gguf"), ("pp2", "hf_dir")])
def test_logprobs_match_transformers(smollm2, reference, layout, source):
    tokens, labels, mask, want = reference
    kw = {"tp1": dict(), "tp3": dict(tensor_model_parallel_size=3), "pp2": dict(pipeline_model_parallel_size=2)}[layout]
    world = {"tp1": 1, "tp3": 3, "pp2": 2}[layout]
    path = str(getattr(smollm2, source))
    results = run_on_ranks(world, _rank_logits, path, tokens, timeout=600, **kw)
    shards = [torch.load(io.BytesIO(r)) for r in results]
    logits = torch.cat([s for s in shards if s is not None], dim=-1)  # TP ranks in vocab order
    got = _logprobs(logits, labels)
    err = (got - want)[mask].abs().max().item()
    assert err < TOL, f"{layout} from {source}: max |log-prob difference| {err:.2e}"
    # the model is a trained one, not noise (uniform would be -log(49152) = -10.8 per token)
    assert want[mask].mean().item() > -6.0
