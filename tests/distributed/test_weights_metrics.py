"""``weights/*`` in metrics.jsonl are the global token means over the global batch, whatever the
micro-batch size: TGDPO at DP=2 with micro-batch 1, 2 and 4 (4, 2 and 1 micro-batches per rank) against
the same quantities computed here independently, in float64 with ``transformers``, from the pairs of
each global batch (the sampler's global stream: positions [k*G, (k+1)*G) for iteration k+1).

    r_t = beta * (log p_guide(y_t) - log p_ref(y_t));  w_t = 1 + alpha * r_t (chosen), 1 - alpha * r_t (rejected)
    weights/chosen_mean = sum of w over the chosen tokens of the global batch / their number
    weights/rejected_mean = the same over the rejected tokens
    weights/negative_fraction = number of response tokens with w < 0 / number of response tokens
"""
from __future__ import annotations


import pytest
import torch
import transformers

from megatron_tgdpo.models.llama import LlamaArch
from megatron_tgdpo.testing import read_metrics, run_on_ranks, run_train

ARCH = LlamaArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=64, max_position_embeddings=128, rope_theta=10000.0)
GLOBAL_BATCH, ITERS, SEED = 8, 2, 1234
BETA, ALPHA = 0.5, 2.0  # large, so that the weights spread well beyond 1 and some turn negative


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_tgdpo.convert.synthetic import write_synthetic_hf

    tmp = tmp_path_factory.mktemp("weights")
    return tmp, {role: write_synthetic_hf(tmp / role, ARCH, dtype=torch.float32, seed=seed)
                 for role, seed in (("reference", 11), ("guidance", 12))}


def _response_logps(model, prompt, response) -> torch.Tensor:
    """float64 log-probs of each response token given everything before it."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1:]


def _expected(tmp, paths) -> list[dict[str, float]]:
    from megatron_tgdpo.data import PreferenceDataset
    from megatron_tgdpo.data.builtin import builtin_dataset
    from megatron_tgdpo.data.sampler import epoch_permutation

    dataset = PreferenceDataset(builtin_dataset(tmp / "data")["train_prefix"])
    order = epoch_permutation(len(dataset), seed=SEED, epoch=0)
    hf = {role: transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
          for role, path in paths.items()}
    out = []
    for k in range(ITERS):
        weights = {"chosen": [], "rejected": []}
        for index in order[k * GLOBAL_BATCH:(k + 1) * GLOBAL_BATCH]:
            pair = dataset[int(index)]
            for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
                reward = BETA * (_response_logps(hf["guidance"], pair["prompt"], pair[side])
                                 - _response_logps(hf["reference"], pair["prompt"], pair[side]))
                weights[side].append(1.0 + sign * ALPHA * reward)
        chosen, rejected = torch.cat(weights["chosen"]), torch.cat(weights["rejected"])
        both = torch.cat([chosen, rejected])
        out.append({"weights/chosen_mean": chosen.mean().item(), "weights/rejected_mean": rejected.mean().item(),
                    "weights/negative_fraction": (both < 0).double().mean().item()})
    return out


def test_weight_metrics_are_global_token_means_for_any_micro_batch(models):
    tmp, paths = models
    expected = _expected(tmp, paths)
    assert 0.0 < expected[0]["weights/negative_fraction"] < 0.5  # the test data exercises the sign
    assert abs(expected[0]["weights/chosen_mean"] - 1.0) > 1e-2
    for micro in (1, 2, 4):
        log = tmp / f"log-mbs{micro}"
        argv = ["--ref-load", str(paths["reference"]), "--guidance-load", str(paths["guidance"]),
                "--loss-type", "tgdpo", "--alpha", str(ALPHA), "--beta", str(BETA), "--train-iters", str(ITERS),
                "--micro-batch-size", str(micro), "--global-batch-size", str(GLOBAL_BATCH), "--seq-length", "64",
                "--lr", "1e-3", "--seed", str(SEED), "--data-cache-dir", str(tmp / "data"), "--eval-iters", "0",
                "--no-tensorboard", "--log-dir", str(log), "--no-pack-sequences"]
        assert run_on_ranks(2, run_train, argv, model_parallel=False) == [0, 0]
        rows = read_metrics(log)
        assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))
        for row, want in zip(rows, expected):
            for key, value in want.items():
                assert row[key] == pytest.approx(value, abs=2e-5), (micro, row["iteration"], key)
