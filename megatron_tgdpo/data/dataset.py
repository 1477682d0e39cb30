"""Read prepared preference pairs: ``PreferenceDataset(prefix)[i]`` -> prompt / chosen / rejected ids."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megatron_tgdpo.data.errors import DataFormatError
from megatron_tgdpo.data.manifest import SEQUENCES_PER_PAIR, check_data_files, read_manifest

__all__ = ["PreferenceDataset"]


class PreferenceDataset:
    """Pairs of a prepared data set (see ``docs/data.md``), memory-mapped.

    ``ds[i]`` is ``{"prompt", "chosen", "rejected", "index"}``: int32 arrays (responses without the
    prompt, ending with the end-of-response token unless truncated) and ``i``. Opening checks the
    manifest (format, version) and that ``.bin``/``.idx`` match it in size and in layout; pass
    ``verify_sha256=True`` to hash the files too. Picklable, so DataLoader workers can use it.
    """

    def __init__(self, prefix: str | Path, *, verify_sha256: bool = False) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.manifest: dict[str, Any] = read_manifest(prefix)
        check_data_files(prefix, self.manifest, verify_sha256=verify_sha256)
        try:
            self._indexed = IndexedDataset(self.prefix, mmap=True)
        except Exception as exc:  # noqa: BLE001 - megatron asserts/raises variously on a bad index
            raise DataFormatError(f"{self.prefix}.idx: cannot be read as an IndexedDataset ({exc}); prepare the data again") from exc
        self._num_pairs = int(self.manifest["num_pairs"])
        lengths = self._indexed.sequence_lengths
        documents = self._indexed.document_indices
        expected_documents = np.arange(0, SEQUENCES_PER_PAIR * self._num_pairs + 1, SEQUENCES_PER_PAIR)
        if len(lengths) != SEQUENCES_PER_PAIR * self._num_pairs or not np.array_equal(documents, expected_documents):
            raise DataFormatError(
                f"{self.prefix}.idx: holds {len(lengths)} sequences in {len(documents) - 1} documents, but the manifest "
                f"says {self._num_pairs} pairs of {SEQUENCES_PER_PAIR}; the files do not belong together, prepare the data again"
            )
        self._lengths = np.asarray(lengths, dtype=np.int64).reshape(self._num_pairs, SEQUENCES_PER_PAIR)

    def __len__(self) -> int:
        return self._num_pairs

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if i < 0:
            i += self._num_pairs
        if not 0 <= i < self._num_pairs:
            raise IndexError(f"pair index {index} out of range for {self._num_pairs} pairs")
        first = SEQUENCES_PER_PAIR * i
        # The three sequences of a pair are contiguous: one read, split in three.
        prompt, chosen, rejected = self._indexed[first : first + SEQUENCES_PER_PAIR]
        return {
            "prompt": prompt.astype(np.int32, copy=True),
            "chosen": chosen.astype(np.int32, copy=True),
            "rejected": rejected.astype(np.int32, copy=True),
            "index": i,
        }

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_pairs, 3]: prompt, chosen, rejected lengths (no I/O beyond the index)."""
        return self._lengths

    @property
    def row_lengths(self) -> np.ndarray:
        """int64 [num_pairs]: the longer training row of each pair (prompt + longer response)."""
        return self._lengths[:, 0] + self._lengths[:, 1:].max(axis=1)

    def __repr__(self) -> str:
        return f"PreferenceDataset({self.prefix!r}, pairs={self._num_pairs})"
