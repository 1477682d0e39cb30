"""The sampler every command uses: a model at its trained layout with its tokenizer and stop ids.

``megatron-tgdpo generate`` (``generation/cli.py``), the pipeline's sampling worker
(``pipeline/sample.py``), PPO's held-out evaluation and the RTO comparison (through the pipeline's
worker) all sample through a :class:`Sampler`, so a model's responses end at the same tokens wherever
they are drawn. The stop rule (:func:`stop_ids`) is the union of

* the tokenizer's EOS,
* the id the chat template closes an assistant turn with (``<|eot_id|>`` for Llama-3), and
* the ``eos_token_id`` (one id or a list) of the model directory's ``generation_config.json``, when it
  has one: Hugging Face models list their end-of-turn ids there, and ``transformers`` and vLLM stop
  on them.

Token choice is ``sampling.py``'s, the batched KV-cached loop ``engine.py``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_tgdpo.data.tokenizer import Tokenizer, load_tokenizer
from megatron_tgdpo.generation import model_files, output
from megatron_tgdpo.generation.config import GeneratedSequence, GenerationError, SamplingConfig
from megatron_tgdpo.generation.engine import Progress, generate
from megatron_tgdpo.generation.prompts import PromptRecord, stop_token_ids

__all__ = ["Sampler", "build_chunks", "stop_ids", "tokenizer_for"]


def stop_ids(tokenizer: Tokenizer, *, model_dir: Optional[str | Path]) -> list[int]:
    """The ids that end a response (see the module docstring), sorted. ``model_dir``: where the
    model's weights come from (its ``generation_config.json`` is read when there is one)."""
    declared = model_files.generation_config_eos_ids(model_dir) if model_dir is not None else []
    return sorted(set(stop_token_ids(tokenizer)) | set(declared))


def tokenizer_for(load: str | Path, *, tokenizer: Optional[str | Path] = None,
                  chat_template: Optional[str] = None) -> Tokenizer:
    """``tokenizer`` (default: the one that belongs to ``load``: a model directory's own files, or the
    one its training run used) with ``chat_template`` (default: the training data's, else the
    tokenizer's own choice). Raises :class:`GenerationError` when ``load`` names no tokenizer."""
    if tokenizer is not None and chat_template is not None:
        return load_tokenizer(tokenizer, chat_template=chat_template)
    found = model_files.default_tokenizer(load)
    path = tokenizer or found.path
    if path is None:
        raise GenerationError(f"a tokenizer is needed for {load}: {found.origin}")
    return load_tokenizer(path, chat_template=chat_template or found.chat_template)


def build_chunks(arch: Any, *, layout: Any = None, precision: Any = None) -> list[torch.nn.Module]:
    """This rank's model chunks of ``arch`` (a ``models.llama.LlamaArch``) at ``layout`` (default: one
    rank), with freshly initialised weights; call inside initialised model-parallel groups."""
    from megatron_tgdpo.models import llama

    layout = layout or llama.ParallelLayout()
    return llama.build_model(arch, llama.transformer_config(arch, layout, precision or llama.Precision()))


@dataclass(frozen=True)
class Sampler:
    """``chunks`` (this rank's, at their trained layout; training chunks are fine, their state is
    restored after each call), the ``tokenizer`` that renders prompts and decodes responses, and the
    ids that end a response (:func:`stop_ids`)."""

    chunks: list
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]

    @classmethod
    def load(cls, load: str | Path, *, model: str = "tiny", tokenizer: Optional[str | Path | Tokenizer] = None,
             chat_template: Optional[str] = None, layout: Any = None, precision: Any = None,
             chunks: Optional[list] = None) -> "Sampler":
        """``load`` (a torch_dist checkpoint, a converted or a Hugging Face directory) ready to sample:
        built at ``layout`` (or into ``chunks`` of the same architecture, to reuse a model already
        built), weights loaded, tokenizer and stop ids as :func:`tokenizer_for` and :func:`stop_ids`
        find them (``tokenizer`` may also be one already loaded). ``model``: the preset for a torch_dist
        checkpoint that records no architecture."""
        if chunks is None:
            arch, _ = model_files.model_arch(load, model=model)
            chunks = build_chunks(arch, layout=layout, precision=precision)
        model_files.load_weights(load, chunks)
        found = (tokenizer if isinstance(tokenizer, Tokenizer)
                 else tokenizer_for(load, tokenizer=tokenizer, chat_template=chat_template))
        return cls(chunks=chunks, tokenizer=found, stop_ids=tuple(stop_ids(found, model_dir=load)))

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, sampling: SamplingConfig, max_new_tokens: int,
               seed: int, micro_batch_size: int = 8, prompt_keys: Optional[Sequence[int]] = None,
               progress: Optional[Callable[[Progress], None]] = None) -> list[GeneratedSequence]:
        """``engine.generate`` with this sampler's stop ids, never choosing an id the tokenizer lacks
        (a padded vocabulary's extra rows). ``micro_batch_size`` counts rows (prompts x samples)."""
        return generate(self.chunks, prompt_ids, sampling=sampling, eos_ids=self.stop_ids,
                        max_new_tokens=max_new_tokens, seed=seed, micro_batch_size=micro_batch_size,
                        prompt_keys=prompt_keys, vocab_limit=self.tokenizer.vocab_size, progress=progress)

    def samples_by_prompt(self, results: Sequence[GeneratedSequence]) -> dict[int, list[dict[str, Any]]]:
        """The samples file's ``samples`` entries of ``results``, by prompt index, in sample order."""
        out: dict[int, list[dict[str, Any]]] = {}
        for seq in results:
            out.setdefault(seq.prompt_index, []).append(output.sample_record(seq, self.tokenizer))
        return out

    def write_samples_file(self, path: str | Path, records: Sequence[PromptRecord],
                           results: Sequence[GeneratedSequence]) -> None:
        """The samples file (``output.py``) of ``records`` and their ``results``, published atomically."""
        per_prompt = self.samples_by_prompt(results)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        output.write_jsonl_atomic(path, (output.output_record(r.fields, per_prompt[i]) for i, r in enumerate(records)))
