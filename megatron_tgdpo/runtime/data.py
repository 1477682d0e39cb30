"""This data-parallel rank's micro-batches of each global batch, resumable from a consumed-samples count.

Unpacked (``--no-pack-sequences``): ``global batch / (micro-batch x DP)`` micro-batches of rows, padded to
the longest row (to ``--seq-length`` with pipeline parallelism). Packed (``--pack-sequences``): this rank's
``global batch / DP`` pairs, in the shuffled stream order, packed first-fit-decreasing into rows of up to
``2 x micro-batch x seq-length`` tokens (``data/packing.py``); the number of micro-batches varies, and
so does each row's length (what it holds, rounded up; with pipeline parallelism the stages exchange the
shape of every micro-batch: megatron-core's ``variable_seq_lengths``; with virtual stages all rows of a
step share one length, that of its fullest bin, and the pairs are spread over a multiple of PP bins, see
``setup.variable_row_lengths`` and ``data.packing.plan_packing``).
Both are deterministic from ``--seed`` and the consumed-samples count, so resume is exact."""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_tgdpo.config import TrainConfig, shares_prompt
from megatron_tgdpo.data.batch import Batch

__all__ = ["BatchSource"]


class BatchSource:
    """Global batches of ``--global-batch-size`` pairs from a prepared data set, as :class:`Batch` lists.

    Deterministic from ``--seed`` and the consumed-samples count: a run resumed with the count saved in
    its checkpoint sees exactly the micro-batches an uninterrupted run would have seen."""

    def __init__(self, cfg: TrainConfig, prefix: str, pad_id: int, *, consumed_samples: int, shuffle: bool,
                 fixed_length: Optional[int] = None, sequences: bool = False):
        from megatron.core import parallel_state as ps

        from megatron_tgdpo.data import PreferenceDataset, PreferenceSampler
        from megatron_tgdpo.data.collate import PreferenceCollator, SequenceCollator, padding_multiple
        from megatron_tgdpo.distributed import current_device

        self.dataset = PreferenceDataset(prefix)
        self.dp = ps.get_data_parallel_world_size()
        self.sampler = PreferenceSampler(
            len(self.dataset),
            micro_batch_size=cfg.micro_batch_size,
            data_parallel_rank=ps.get_data_parallel_rank(),
            data_parallel_size=self.dp,
            consumed_samples=consumed_samples,
            seed=cfg.seed,
            shuffle=shuffle,
        )
        self.iterator = iter(self.sampler)
        # Pipeline parallelism needs one shape for every micro-batch.
        if fixed_length is None and cfg.pipeline_model_parallel_size > 1:
            fixed_length = cfg.seq_length
        # Pairs: rows [chosen; rejected]. Sequences (SFT): prompt + chosen response, one row each.
        self.sequences = sequences
        multiple = padding_multiple(pad_to_multiple_of=cfg.pad_to_multiple_of,
                                    tensor_parallel=cfg.tensor_model_parallel_size,
                                    sequence_parallel=cfg.sequence_parallel, context_parallel=cfg.context_parallel_size)
        self.collate = (SequenceCollator if sequences else PreferenceCollator)(
            pad_id=pad_id,
            pad_to_multiple_of=multiple,
            context_parallel_size=cfg.context_parallel_size,
            fixed_length=fixed_length,
        )
        self.num_micro = cfg.global_batch_size // (cfg.micro_batch_size * self.dp)
        self.max_len = cfg.seq_length
        self.device = current_device()
        self.packer = None
        if cfg.pack_sequences:
            from megatron_tgdpo.data.packing import PAIR_SIDES, PackedPreferenceCollator, capacity_for

            cp = cfg.context_parallel_size
            self.capacity = capacity_for(micro_batch_size=cfg.micro_batch_size, seq_length=cfg.seq_length)
            # Rows: the layout's padding multiple (the packer takes the lcm with 2*CP itself).
            from megatron_tgdpo.runtime.setup import variable_row_lengths

            # Stages that exchange no shapes (virtual stages) need one row length per step: the plan's.
            self.uniform_rows = not variable_row_lengths(cfg) and cfg.pipeline_model_parallel_size > 1
            self.packer = PackedPreferenceCollator(
                pad_id=pad_id, context_parallel_size=cp, pad_to_multiple_of=multiple,
                sides=("chosen",) if sequences else PAIR_SIDES,
                share_prompt=shares_prompt(cfg))
            vpp = cfg.virtual_pipeline_model_parallel_size
            # The interleaved schedule wants whole groups of PP micro-batches: pad with empty ones.
            self.micro_multiple = cfg.pipeline_model_parallel_size if vpp else 1

    def next_global_batch(self) -> list[Batch]:
        if self.packer is not None:
            return self._next_packed()
        batches = []
        for _ in range(self.num_micro):
            items = [self.dataset[i] for i in next(self.iterator)]
            rows = self.collate(items)
            if rows["input_ids"].shape[1] > self.max_len:
                raise RuntimeError(
                    f"a micro-batch is {rows['input_ids'].shape[1]} tokens long, over --seq-length {self.max_len}; "
                    "prepare the data with --max-seq-length <= --seq-length"
                )
            if self.sequences:
                real = sum(len(i["prompt"]) + len(i["chosen"]) for i in items)
                batch = Batch.from_rows(rows, real_tokens=real)
            else:
                real = sum(2 * len(i["prompt"]) + len(i["chosen"]) + len(i["rejected"]) for i in items)
                batch = Batch.from_rows(rows, num_pairs=len(items), real_tokens=real)
            batches.append(batch.to(self.device))
        return batches

    def _next_packed(self) -> list[Batch]:
        items = [self.dataset[i] for _ in range(self.num_micro) for i in next(self.iterator)]
        lengths = [(len(i["prompt"]), len(i["chosen"]), len(i["rejected"])) for i in items]
        plan = self.packer.plan(lengths, capacity=self.capacity, sample_ids=[i["index"] for i in items],
                                bin_multiple=self.micro_multiple, uniform_rows=self.uniform_rows)
        packer = self.packer if plan.row_length is None else dataclasses.replace(self.packer, fixed_length=plan.row_length)
        batches = [packer([items[j] for j in bin_]) for bin_ in plan.bins]
        batches += [packer.padding_batch() for _ in range(plan.padding_bins)]
        return [batch.to(self.device) for batch in batches]
