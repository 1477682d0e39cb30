"""One rollout: sample from the current policy, lay the sequences out as trainer rows, score every token.

**Sampling** runs on the policy's own training chunks (``generation.generate``, any TP/PP, sequence
parallelism switched off while decoding), on every rank of each model-parallel group with the same
prompts; each data-parallel replica samples its own prompts. Randomness is keyed by (``--seed``, the
prompt's stream position, sample index, step), so a rollout does not depend on the layout, the
data-parallel split or an interruption.

**Rows.** Sequence ``n`` is prompt + response (the stop token included when the model produced one),
one row, in the trainer's layout (``data.collate.collate_rows``: ``labels`` shifted by one,
``loss_mask`` 1 on the response tokens), padded to the rollout's longest row (with pipeline
parallelism to ``--seq-length``: every micro-batch must have one shape).

**Scores** (forward only, through the same schedule and log-prob op as training, so the actor's
first-epoch ratios are exactly 1): the policy's log-probs (the behaviour policy's; the sampler's own
log-probs are kept to report how far the cached-decode path is from them), the reference's, the DPO
reward model's (dense reward), and the critic's values. They exist on the last pipeline stage only
(``None`` elsewhere), which is where the losses are evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_tgdpo.data.batch import Batch
from megatron_tgdpo.data.collate import collate_rows
from megatron_tgdpo.generation import GeneratedSequence, SamplingConfig, generate
from megatron_tgdpo.runtime.schedule import LogprobSettings, score_logps

__all__ = ["Rollout", "sample", "to_rows"]

#: mixed into --seed for rollout sampling, so rollouts differ from other users of the same seed
ROLLOUT_SEED_SALT = 0x5050_4F00


@dataclass
class Rollout:
    """This data-parallel rank's sequences of one iteration (see the module docstring)."""

    iteration: int
    prompts: list[list[int]]
    responses: list[list[int]]
    finish: list[str]
    records: list[dict]  # the prompt record of each sequence
    keys: list[int]  # the prompt's sampling key (stream position)
    sampler_logps: list[list[float]]
    rows: dict[str, torch.Tensor]  # input_ids, labels, loss_mask, position_ids: [N, L]
    #: last pipeline stage only: old_logps, ref_logps, [dpo_logps], values, rewards, advantages, returns
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def mask(self) -> torch.Tensor:
        return self.rows["loss_mask"]

    def micro_batches(self, order: Sequence[int], size: int, *, extra: Sequence[str] = ()) -> list[Batch]:
        """Rows ``order`` as micro-batches of ``size`` rows; the named per-token tensors ride along
        where this rank has them (the last pipeline stage)."""
        out = []
        device = self.rows["input_ids"].device
        for start in range(0, len(order), size):
            idx = torch.as_tensor(list(order[start:start + size]), dtype=torch.long, device=device)
            chosen = {k: v.index_select(0, idx) for k, v in self.rows.items()}
            real = int(sum(len(self.prompts[i]) + len(self.responses[i]) for i in idx.tolist()))
            batch = Batch.from_rows(chosen, real_tokens=real)
            present = {k: self.tensors[k].index_select(0, idx) for k in extra if k in self.tensors}
            out.append(batch.with_per_token(**present) if present else batch)
        return out


def rollout_seed(seed: int) -> int:
    return (int(seed) ^ ROLLOUT_SEED_SALT) & 0x7FFF_FFFF_FFFF_FFFF


def sample(chunks: list, prompt_ids: Sequence[Sequence[int]], keys: Sequence[int], *, samples_per_prompt: int,
           temperature: float, max_new_tokens: int, eos_ids: Sequence[int], seed: int, batch_size: int,
           vocab_limit: Optional[int]) -> list[GeneratedSequence]:
    """``samples_per_prompt`` responses to each prompt (prompt-major), with the sampler's log-probs."""
    if not prompt_ids:
        return []
    sampling = SamplingConfig(temperature=temperature, num_samples=samples_per_prompt, return_logprobs=True)
    return generate(chunks, prompt_ids, sampling=sampling, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                    seed=rollout_seed(seed), micro_batch_size=batch_size, prompt_keys=keys, vocab_limit=vocab_limit)


def row_length(longest: int, *, pad_to_multiple_of: int, fixed_length: Optional[int]) -> int:
    if fixed_length is not None:
        return fixed_length
    return max(1, -(-longest // pad_to_multiple_of)) * pad_to_multiple_of


def to_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
            pad_to_multiple_of: int, fixed_length: Optional[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The trainer's row tensors for (prompt, response) pairs (``collate_rows``)."""
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    seq = row_length(longest, pad_to_multiple_of=pad_to_multiple_of, fixed_length=fixed_length)
    rows = collate_rows([np.asarray(p, dtype=np.int64) for p in prompts],
                        [np.asarray(r, dtype=np.int64) for r in responses], pad_id=pad_id, seq=seq,
                        names=[f"rollout sequence {i}" for i in range(len(prompts))], fixed_length=fixed_length)
    return {k: v.to(device) for k, v in rows.items()}


def build(iteration: int, generated: list[GeneratedSequence], prompt_ids: Sequence[Sequence[int]],
          records: Sequence[dict], keys: Sequence[int], *, pad_id: int, pad_to_multiple_of: int,
          fixed_length: Optional[int], device: torch.device) -> Rollout:
    prompts = [list(prompt_ids[g.prompt_index]) for g in generated]
    responses = [list(g.tokens) for g in generated]
    rows = to_rows(prompts, responses, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                   fixed_length=fixed_length, device=device)
    return Rollout(iteration=iteration, prompts=prompts, responses=responses,
                   finish=[g.finish_reason for g in generated], records=[records[g.prompt_index] for g in generated],
                   keys=[keys[g.prompt_index] for g in generated],
                   sampler_logps=[list(g.logprobs or []) for g in generated], rows=rows)


def sampler_logps_tensor(rollout: Rollout) -> torch.Tensor:
    """The sampler's log-probs laid out like the rows (at the response tokens' label positions)."""
    out = torch.zeros(rollout.mask.shape, dtype=torch.float32)
    for i, (prompt, logps) in enumerate(zip(rollout.prompts, rollout.sampler_logps)):
        start = max(len(prompt) - 1, 0)
        out[i, start:start + len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return out.to(rollout.mask.device)


def score(rollout: Rollout, models: dict[str, list], *, micro_batch_size: int, logprobs: LogprobSettings,
          values_fn) -> None:
    """Fill ``rollout.tensors`` (last stage) with ``<role>_logps`` for every model in ``models`` (role ->
    chunks; ``old`` is the policy) and ``values`` from ``values_fn(micro_batches)``."""
    batches = rollout.micro_batches(range(len(rollout)), micro_batch_size)
    for role, chunks in models.items():
        scored = score_logps(chunks, batches, logprobs=logprobs)
        if scored:
            rollout.tensors[f"{role}_logps"] = torch.cat(scored, dim=0).float()
    values = values_fn(batches)
    if values:
        rollout.tensors["values"] = torch.cat(values, dim=0).float() * rollout.mask
