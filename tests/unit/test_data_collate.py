"""PreferenceCollator: row layout, label shift, loss mask exactly on response tokens (EOS included),
padding to multiples (with context parallelism), fixed length and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_tgdpo.data.collate import PreferenceCollator

PAD = 0
EOS = 2
ITEMS = [
    {"prompt": np.array([1, 5, 6, 7], np.int32), "chosen": np.array([8, 9, EOS], np.int32),
     "rejected": np.array([10, EOS], np.int32), "index": 4},
    {"prompt": np.array([1, 5], np.int32), "chosen": np.array([11, 12, 13, 14, 15, EOS], np.int32),
     "rejected": np.array([16, 17, EOS], np.int32), "index": 9},
    {"prompt": np.array([1, 3, 3], np.int32), "chosen": np.array([20, EOS], np.int32),
     "rejected": np.array([21, 22, EOS], np.int32), "index": 0},
]


def _rows(items):
    return [np.concatenate([i["prompt"], i["chosen"]]) for i in items] + [
        np.concatenate([i["prompt"], i["rejected"]]) for i in items
    ]


def test_layout_shift_and_mask():
    batch = PreferenceCollator(pad_id=PAD)(ITEMS)
    assert set(batch) == {"input_ids", "labels", "loss_mask", "position_ids", "sample_idx"}
    assert batch["input_ids"].shape == (6, 16) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["sample_idx"].tolist() == [4, 9, 0]
    assert torch.equal(batch["position_ids"], torch.arange(16).expand(6, 16))
    responses = [i["chosen"] for i in ITEMS] + [i["rejected"] for i in ITEMS]
    prompts = [i["prompt"] for i in ITEMS] * 2
    for r, (row, prompt, response) in enumerate(zip(_rows(ITEMS), prompts, responses)):
        n = len(row)
        ids = batch["input_ids"][r].numpy()
        labels = batch["labels"][r].numpy()
        mask = batch["loss_mask"][r].numpy()
        assert np.array_equal(ids[:n], row) and (ids[n:] == PAD).all()
        assert np.array_equal(labels[: n - 1], row[1:]) and (labels[n - 1 :] == PAD).all()
        # The masked labels are exactly the response, EOS included, in order.
        assert np.array_equal(labels[mask == 1.0], response)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask[: len(prompt) - 1].sum() == 0 and mask[n - 1 :].sum() == 0
        assert labels[np.flatnonzero(mask)[-1]] == EOS


def test_padding_multiple_with_context_parallelism():
    longest = max(len(r) for r in _rows(ITEMS))  # 8
    assert PreferenceCollator(pad_id=PAD, pad_to_multiple_of=1)(ITEMS)["input_ids"].shape[1] == longest
    assert PreferenceCollator(pad_id=PAD, pad_to_multiple_of=4)(ITEMS)["input_ids"].shape[1] == 8
    # lcm(4, 2 * 3) = 12
    assert PreferenceCollator(pad_id=PAD, pad_to_multiple_of=4, context_parallel_size=3)(ITEMS)["input_ids"].shape[1] == 12
    # lcm(1, 2 * 5) = 10 -> 10
    assert PreferenceCollator(pad_id=PAD, pad_to_multiple_of=1, context_parallel_size=5)(ITEMS)["input_ids"].shape[1] == 10


def test_fixed_length():
    batch = PreferenceCollator(pad_id=PAD, fixed_length=32)(ITEMS[:1])
    assert batch["input_ids"].shape == (2, 32) and batch["loss_mask"].sum() == 5
    with pytest.raises(ValueError, match=r"pair 9 \(chosen\) is 8 tokens long, more than fixed_length=6"):
        PreferenceCollator(pad_id=PAD, fixed_length=6)(ITEMS)
    with pytest.raises(ValueError, match="multiple of 2 \\* context_parallel_size"):
        PreferenceCollator(pad_id=PAD, fixed_length=30, context_parallel_size=4)


def test_pad_id_is_used_and_mask_ignores_pad_equal_tokens():
    # A response token equal to the pad id must still be masked in: the mask comes from lengths.
    items = [{"prompt": np.array([1, 4]), "chosen": np.array([7, 7, 2]), "rejected": np.array([7, 2]), "index": 0}]
    batch = PreferenceCollator(pad_id=7, pad_to_multiple_of=8)(items)
    assert batch["input_ids"][1].tolist() == [1, 4, 7, 2, 7, 7, 7, 7]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["loss_mask"][1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_empty_batch_rejected():
    with pytest.raises(ValueError, match="empty"):
        PreferenceCollator(pad_id=PAD)([])
