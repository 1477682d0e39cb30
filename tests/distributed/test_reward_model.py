"""The Bradley–Terry reward model through the trainer (``--loss-type rm``): TP=2 and PP=2 runs, and a run
with packed sequences, give the single-rank padded-rows run's losses, gradient norms and held-out
scores; the saved checkpoint is recognised as a reward model and scores pairs as training did."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

STEPS = 4


def _argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "tiny", "--loss-type", "rm", "--train-iters", str(STEPS), "--micro-batch-size", "2",
            "--global-batch-size", "8", "--seq-length", "64", "--lr", "1e-3", "--seed", "3", "--rm-margin", "0.1",
            "--data-cache-dir", str(tmp.parent / "data"), "--log-dir", str(tmp / name), "--eval-iters", "2",
            "--no-tensorboard", *extra]


def _heldout(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    argv = _argv(tmp, "single", "--save", str(tmp / "ckpt"))
    assert run_on_ranks(1, run_train, argv, model_parallel=False) == [0]
    rows = read_metrics(tmp / "single")
    assert [r["iteration"] for r in rows] == list(range(1, STEPS + 1))
    held = _heldout(tmp / "single")
    assert held[-1]["margin"] > held[0]["margin"]  # it learns: held-out chosen responses score higher
    assert held[0]["loss"] == pytest.approx(0.7444, abs=0.01)  # -log sigmoid(-0.1): scores start nearly equal
    return tmp, rows, held


def _compare(tmp: Path, name: str, reference: list[dict], held: list[dict]) -> None:
    for ours, ref in zip(read_metrics(tmp / name), reference, strict=True):
        for key in ("loss", "grad_norm", "rm/accuracy"):
            assert abs(ours[key] - ref[key]) < 1e-5, f"{name} iteration {ours['iteration']} {key}: {ours[key]} vs {ref[key]}"
    for ours, ref in zip(_heldout(tmp / name), held, strict=True):
        for key in ("loss", "accuracy", "margin", "score_mean", "score_std"):
            # Before training: the same weights, so the same scores. After: the loss sees score differences
            # only, so the common level of the scores gets no gradient but rounding noise, which Adam turns
            # into steps; it may drift apart between layouts by a little more than the differences do.
            tol = 1e-5 if ref["iteration"] == 0 or key in ("loss", "accuracy", "margin") else 1e-3 * abs(ref[key])
            assert abs(ours[key] - ref[key]) <= tol, f"{name} held-out {key}: {ours[key]} vs {ref[key]}"


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_reward_model_layouts_match_single_rank(single, layout):
    tmp, reference, held = single
    name = layout[0].strip("-")
    assert run_on_ranks(2, run_train, _argv(tmp, name, *layout), model_parallel=False) == [0, 0]
    _compare(tmp, name, reference, held)


def test_packed_sequences_match_padded_rows(single):
    tmp, reference, held = single
    assert run_on_ranks(1, run_train, _argv(tmp, "packed", "--pack-sequences"), model_parallel=False) == [0]
    _compare(tmp, "packed", reference, held)


def _score_checkpoint(ckpt: str, data_dir: str) -> dict:
    """One rank: the saved reward model's scores of the first training pairs, and its recognition."""
    from megatron_tgdpo.algorithms.reward_model import build_reward_model, is_reward_model_checkpoint, score_sequences
    from megatron_tgdpo.config import TrainConfig
    from megatron_tgdpo.runtime import setup
    from megatron_tgdpo.runtime.data import BatchSource

    cfg = TrainConfig(data_cache_dir=data_dir, train_iters=1, micro_batch_size=2, global_batch_size=2, seq_length=64,
                      loss_type="rm")
    data = setup.resolve_data(cfg)
    arch, _ = setup.resolve_architecture(cfg, tokenizer_vocab=data.vocab_size)
    chunks = build_reward_model(arch, cfg, load=ckpt, seed=0)
    batches = BatchSource(cfg, data.train_prefix, data.pad_id, consumed_samples=0, shuffle=False).next_global_batch()
    scores = score_sequences(chunks, batches)
    return {"is_rm": is_reward_model_checkpoint(ckpt), "not_rm": is_reward_model_checkpoint(None),
            "scores": [s.tolist() for s in scores], "pairs": [b.num_pairs for b in batches]}


def test_saved_reward_model_is_recognised_and_scores_pairs(single):
    tmp, _, _ = single
    (out,) = run_on_ranks(1, _score_checkpoint, str(tmp / "ckpt"), str(tmp.parent / "data"))
    assert out["is_rm"] and not out["not_rm"]
    (scores,), (pairs,) = out["scores"], out["pairs"]
    assert len(scores) == 2 * pairs and len(set(scores)) == len(scores)  # one distinct score per sequence
