"""A Bradley–Terry reward model on per-token values: where a sequence's score is read, the pairwise
loss, and the per-token value differences that serve as token guidance.

Layout: a value head (``models.value_head``) gives ``values[r, t]`` at every position of a micro-batch,
the trainer's layout (``data.batch``): position ``t`` has read ``input_ids[:, :t+1]`` and ``loss_mask``
is 1 where ``labels[:, t]`` (the *next* token) is a response token. So the last masked position of a
sequence, ``t_last``, has not yet read that sequence's final token; position ``t_last + 1`` (whose input
is the final response token, the stop token when the response has one) is the first to have read the
whole response, and it is where the score is read::

    r(x, y) = values[t_last + 1]

The same position in the packed layout: it belongs to the same sequence (its input is that sequence's
last real token), so no score crosses a sequence boundary.

Loss (Bradley–Terry, as reward models are trained for RLHF): ``-log sigmoid(r(x, y_w) - r(x, y_l) - m)``
per pair, ``m`` an optional margin (0: the plain model).

Token scores: the value before and after each response token, ``V(s_{k+1}) - V(s_k)``; written at the
token's label position ``t`` (like token log-probs) as ``values[t + 1] - values[t]``. Along a response
they sum to ``r(x, y) - V(x)`` (``V(x)``: the value after the prompt), so they split the sequence score
over the tokens that earned it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss_sums", "score_positions", "sequence_scores", "token_value_differences"]

MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]


def score_positions(loss_mask: torch.Tensor, *, sequence_ids: Optional[torch.Tensor] = None,
                    num_sequences: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) ``[N]`` of each sequence's score position ``t_last + 1`` (module docstring).

    Rows layout (``sequence_ids`` None): sequence ``n`` is row ``n``. Packed: ``sequence_ids`` ``[1, S]``
    says which sequence each position holds. A sequence without response tokens, or whose last response
    token is the row's last position (no room for ``t_last + 1``), raises: the collator always keeps the
    final token as an input."""
    keep = loss_mask != 0
    rows_count, seq = keep.shape
    positions = torch.arange(seq, device=loss_mask.device).expand_as(keep)
    if sequence_ids is None:
        last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=1).values
        rows = torch.arange(rows_count, device=loss_mask.device)
    else:
        if num_sequences is None:
            raise ValueError("packed rows need num_sequences")
        ids = sequence_ids.reshape(-1)
        flat = torch.where(keep.reshape(-1), positions.reshape(-1), torch.full_like(ids, -1))
        last = torch.full((num_sequences,), -1, dtype=flat.dtype, device=flat.device)
        owned = ids >= 0
        last = last.scatter_reduce(0, ids[owned].long(), flat[owned], reduce="amax", include_self=True)
        rows = torch.zeros(num_sequences, dtype=torch.long, device=loss_mask.device)
    if bool((last < 0).any()):
        raise ValueError("a sequence has no response tokens: a reward model scores prompt + response")
    if bool((last + 1 >= seq).any()):
        raise ValueError("a sequence's last response token is not an input position (no room after it)")
    return rows, last + 1


def sequence_scores(values: torch.Tensor, loss_mask: torch.Tensor, *, sequence_ids: Optional[torch.Tensor] = None,
                    num_sequences: Optional[int] = None) -> torch.Tensor:
    """``[N]`` scores ``values[t_last + 1]`` per sequence (differentiable through ``values``)."""
    if values.shape != loss_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    rows, cols = score_positions(loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences)
    return values[rows, cols]


def bradley_terry_loss_sums(chosen: torch.Tensor, rejected: torch.Tensor, *,
                            margin: Union[float, torch.Tensor] = 0.0) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
    """(summed ``-log sigmoid(chosen - rejected - margin)`` over the pairs, the pair count, metric sums).

    Metrics (means once divided by their counts): ``loss``, ``rm/accuracy`` (chosen scored strictly
    higher; a tie counts half, so a constant model reads 0.5), ``rm/chosen``, ``rm/rejected``,
    ``rm/margin`` (chosen - rejected)."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be [P]")
    diff = chosen - rejected
    losses = -F.logsigmoid(diff - margin)
    loss = losses.sum()
    count = torch.tensor(float(chosen.numel()), device=chosen.device)
    with torch.no_grad():
        d = diff.detach().float()
        metrics: MetricSums = {
            "loss": (loss.detach().float(), count),
            "rm/accuracy": (((d > 0).float() + 0.5 * (d == 0).float()).sum(), count),
            "rm/chosen": (chosen.detach().float().sum(), count),
            "rm/rejected": (rejected.detach().float().sum(), count),
            "rm/margin": (d.sum(), count),
        }
    return loss, count, metrics


def token_value_differences(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[R, S]``: ``values[t + 1] - values[t]`` at each response token's label position ``t``, 0 elsewhere
    (works for rows and packed layouts alike: ``t + 1`` of a masked ``t`` is in the same sequence)."""
    if values.shape != loss_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    keep = loss_mask != 0
    if bool(keep[:, -1].any()):
        raise ValueError("a response token's label position is the row's last position (no value after it)")
    after = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    return torch.where(keep, after - values, torch.zeros((), dtype=values.dtype, device=values.device))
