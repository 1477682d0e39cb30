"""Preference losses on per-token log-probabilities: DPO, TGDPO, IPO and SimPO, context-parallel aware.

Every loss here is a function of a few *per-sequence* sums of per-token quantities (sum of policy
log-probs, of policy-minus-reference log-ratios, of TGDPO-weighted log-ratios, the response length).
That is what makes context parallelism (CP) cheap: each CP rank sums over the tokens it holds, one
all-reduce of a ``[2B, K]`` tensor makes the sums global, and every rank then evaluates the exact
global loss. The all-reduce is an autograd function whose backward is the identity, so each rank's
backward yields exactly ``d loss / d (its own token log-probs)``, with no CP-size factor. See
:func:`preference_loss` (and ``docs/loss.md``) for how a trainer scales the loss for megatron-core DDP.

Tensor layout (shared with the data pipeline): ``[2B, T]`` with rows ``0..B-1`` the chosen responses
and rows ``B..2B-1`` the rejected ones; row ``i`` and row ``B + i`` form pair ``i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_SIMPO_GAMMA",
    "LOSS_TYPES",
    "MetricSums",
    "PreferenceLossSums",
    "WeightClamp",
    "all_reduce_sum_identity_grad",
    "preference_loss",
    "preference_loss_sums",
    "tgdpo_token_weights",
]

LOSS_TYPES = ("dpo", "tgdpo", "ipo", "simpo")
DEFAULT_BETA = 0.1
DEFAULT_ALPHA = 0.5
# Absolute margin gamma in SimPO's sigmoid argument (not the gamma/beta ratio the SimPO paper tunes);
# 0.5 is also TRL's CPOConfig.simpo_gamma default, which is absolute too.
DEFAULT_SIMPO_GAMMA = 0.5

WeightClamp = tuple[float | None, float | None]

_FLOAT_DTYPES = (torch.float32, torch.float64)
_OPTION_NAMES = ("label_smoothing", "weight_clamp", "simpo_gamma", "token_weights", "clamped_tokens")
_SIGMOID_LOSSES = ("dpo", "tgdpo", "simpo")


# --------------------------------------------------------------------------------------------
# Context-parallel reduction
# --------------------------------------------------------------------------------------------


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Forward: SUM all-reduce over ``group``. Backward: identity."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ARG004
        reduced = tensor.clone()  # all_reduce is in place; never overwrite the caller's tensor
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        # Not a second all-reduce: every rank computes the same loss from the same global sums, so
        # grad_output already is d loss / d global_sum on every rank, and a rank's local partial sum
        # enters the global sum with coefficient 1. Summing over ranks would scale grads by CP size.
        return grad_output, None


def all_reduce_sum_identity_grad(
    tensor: torch.Tensor, *, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (forward); pass gradients through unchanged (backward).

    A no-op (no collective) when ``group`` is None or has one rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSumIdentityGrad.apply(tensor, group)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    label_smoothing: float
    weight_clamp: WeightClamp | None
    simpo_gamma: float
    token_weights: torch.Tensor | None = None
    clamped_tokens: torch.Tensor | None = None


def _finite_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _check_weight_clamp(weight_clamp: Sequence[float | None] | None) -> WeightClamp | None:
    if weight_clamp is None:
        return None
    if isinstance(weight_clamp, (str, bytes)) or not isinstance(weight_clamp, Sequence) or len(weight_clamp) != 2:
        raise TypeError(f"weight_clamp must be None or a (low, high) pair of float-or-None, got {weight_clamp!r}")
    low, high = (None if b is None else _finite_float("weight_clamp bound", b) for b in weight_clamp)
    if low is not None and high is not None and low > high:
        raise ValueError(f"weight_clamp low bound {low} is above the high bound {high}")
    return (low, high)


def _parse_options(loss_type: str, options: Mapping[str, Any]) -> _Options:
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"preference_loss() got unknown option(s): {', '.join(unknown)}; known options are "
            f"{', '.join(_OPTION_NAMES)}"
        )
    label_smoothing = _finite_float("label_smoothing", options.get("label_smoothing", 0.0))
    weight_clamp = _check_weight_clamp(options.get("weight_clamp"))
    gamma = options.get("simpo_gamma")
    simpo_gamma = DEFAULT_SIMPO_GAMMA if gamma is None else _finite_float("simpo_gamma", gamma)

    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    # An option the loss type does not use is refused rather than ignored, so that a config that sets
    # a clamp on a dpo run (say) fails loudly instead of silently training something else.
    if label_smoothing != 0.0 and loss_type not in _SIGMOID_LOSSES:
        raise ValueError(f"label_smoothing applies to {_SIGMOID_LOSSES}, not to loss_type={loss_type!r}")
    if weight_clamp is not None and loss_type != "tgdpo":
        raise ValueError(f"weight_clamp applies to loss_type='tgdpo' only, not to {loss_type!r}")
    if gamma is not None and loss_type != "simpo":
        raise ValueError(f"simpo_gamma applies to loss_type='simpo' only, not to {loss_type!r}")
    token_weights, clamped_tokens = options.get("token_weights"), options.get("clamped_tokens")
    if token_weights is not None and loss_type != "tgdpo":
        raise ValueError(f"token_weights applies to loss_type='tgdpo' only, not to {loss_type!r}")
    if token_weights is not None and weight_clamp is not None:
        raise ValueError("weight_clamp applies to weights computed here from guide_logps; clamp token_weights "
                         "where they are made")
    if clamped_tokens is not None and token_weights is None:
        raise ValueError("clamped_tokens describes token_weights; pass both or neither")
    return _Options(label_smoothing=label_smoothing, weight_clamp=weight_clamp, simpo_gamma=simpo_gamma,
                    token_weights=token_weights, clamped_tokens=clamped_tokens)


def _check_logps(name: str, tensor: Any, *, like: torch.Tensor | None, packed: bool = False) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; per-token log-probs must be float32 (or float64): sums over "
            "thousands of tokens in bf16/fp16 lose the precision the loss depends on"
        )
    if like is None:
        if packed:
            if tensor.dim() != 2:
                raise ValueError(f"{name} must be [rows, T] with sequence_ids, got shape {tuple(tensor.shape)}")
            return
        if tensor.dim() != 2 or tensor.shape[0] < 2 or tensor.shape[0] % 2:
            raise ValueError(
                f"{name} must be [2B, T] (B chosen rows then B rejected rows), got shape {tuple(tensor.shape)}"
            )
        return
    if tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)} like policy_logps")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected {like.dtype} like policy_logps")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device}, expected {like.device} like policy_logps")


def _check_mask(loss_mask: Any, *, like: torch.Tensor) -> torch.Tensor:
    """Validate ``loss_mask`` and return it as bool (nonzero = response token)."""
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    if loss_mask.shape != like.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, expected {tuple(like.shape)}")
    if loss_mask.device != like.device:
        raise ValueError(f"loss_mask is on {loss_mask.device}, expected {like.device}")
    if loss_mask.is_complex():
        raise TypeError(f"loss_mask must be bool, integer or float, got {loss_mask.dtype}")
    return loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0


def _check_coefficients(*, beta: Any, alpha: Any) -> tuple[float, float]:
    beta = _finite_float("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return beta, _finite_float("alpha", alpha)


# --------------------------------------------------------------------------------------------
# Token weights
# --------------------------------------------------------------------------------------------


def _masked(tensor: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    # torch.where, not multiplication: masked positions may hold inf/nan (0 * inf = nan), and where's
    # backward sends exactly zero gradient to the positions it did not select.
    return torch.where(response, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def _row_sign(rows: int, *, like: torch.Tensor) -> torch.Tensor:
    """+1 for chosen rows, -1 for rejected rows, shaped ``[2B, 1]``."""
    sign = torch.ones(rows, 1, dtype=like.dtype, device=like.device)
    sign[rows // 2 :] = -1.0
    return sign


def _token_weights(
    guide: torch.Tensor,
    ref: torch.Tensor,
    response: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    weight_clamp: WeightClamp | None,
    num_pairs: int | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (0 where masked) and a bool map of the response tokens the clamp changed. The sign is
    + on chosen and - on rejected responses: by row, or by sequence index for packed rows."""
    with torch.no_grad():
        token_reward = beta * (_masked(guide.detach(), response) - _masked(ref.detach(), response))
        if sequence_ids is None:
            sign = _row_sign(guide.shape[0], like=guide)
        else:
            sign = torch.where(sequence_ids < num_pairs, 1.0, -1.0).to(guide.dtype)
        raw = 1.0 + alpha * sign * token_reward
        weights = raw
        if weight_clamp is not None and weight_clamp != (None, None):
            weights = raw.clamp(min=weight_clamp[0], max=weight_clamp[1])
        clamped = (weights != raw) & response
        return _masked(weights, response), clamped


def tgdpo_token_weights(
    guide_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    weight_clamp: WeightClamp | None = None,
) -> torch.Tensor:
    """TGDPO token weights ``[2B, T]``, detached.

    With ``r = beta * (guide_logps - ref_logps)`` (the guidance model's induced DPO token reward):
    ``1 + alpha * r`` on chosen rows, ``1 - alpha * r`` on rejected rows, clamped to ``weight_clamp =
    (low, high)`` when given (either bound may be None), and 0 where ``loss_mask`` is 0.
    """
    _check_logps("guide_logps", guide_logps, like=None)
    _check_logps("ref_logps", ref_logps, like=guide_logps)
    response = _check_mask(loss_mask, like=guide_logps)
    beta, alpha = _check_coefficients(beta=beta, alpha=alpha)
    weights, _ = _token_weights(
        guide_logps, ref_logps, response, beta=beta, alpha=alpha, weight_clamp=_check_weight_clamp(weight_clamp)
    )
    return weights


# --------------------------------------------------------------------------------------------
# Per-sequence sums
# --------------------------------------------------------------------------------------------


def _per_sequence(sequence_ids: torch.Tensor | None, num_sequences: int):
    """Reducer ``[R, T] -> [N]``: row sums (one sequence per row), or sums by ``sequence_ids`` (packed
    rows; -1 marks positions that belong to no sequence)."""
    if sequence_ids is None:
        return lambda values: values.sum(-1)
    ids = sequence_ids.reshape(-1)
    keep = ids >= 0
    kept = ids[keep]

    def reduce(values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(-1)[keep]
        return flat.new_zeros(num_sequences).index_add(0, kept, flat)

    return reduce


def _sequence_sums(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    response: torch.Tensor,
    weights: torch.Tensor | None,
    clamped: torch.Tensor | None,
    *,
    cp_group: dist.ProcessGroup | None,
    per_sequence=None,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums over this rank's tokens, all-reduced over ``cp_group`` in one collective.

    Keys: ``policy`` (sum log pi), ``tokens`` (response length), and with a reference ``logratio``
    (sum of log pi - log ref); with weights ``weighted`` (sum f * logratio), ``weight_sum``,
    ``weight_negative`` and ``weight_clamped`` (token counts). Each value is ``[2B]``.
    """
    total = per_sequence or (lambda values: values.sum(-1))
    policy = _masked(policy_logps, response)
    columns: dict[str, torch.Tensor] = {
        "policy": total(policy),
        "tokens": total(response.to(policy.dtype)),
    }
    if ref_logps is not None:
        logratio = policy - _masked(ref_logps.detach(), response)
        columns["logratio"] = total(logratio)
        if weights is not None:
            columns["weighted"] = total(weights * logratio)
            columns["weight_sum"] = total(weights)
            columns["weight_negative"] = total(((weights < 0) & response).to(policy.dtype))
            columns["weight_clamped"] = total(clamped.to(policy.dtype))
    stacked = all_reduce_sum_identity_grad(torch.stack(list(columns.values()), dim=-1), group=cp_group)
    return dict(zip(columns, stacked.unbind(-1)))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _split_pairs(per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_pairs = per_row.shape[0] // 2
    return per_row[:num_pairs], per_row[num_pairs:]


def _length_mean(sums: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    # clamp: a response with no tokens has mean 0 instead of nan; checking for it would cost a
    # device-to-host sync on every micro-batch, and the data pipeline is the place to reject it.
    return sums[key] / sums["tokens"].clamp(min=1.0)


def _pair_logits(sums: dict[str, torch.Tensor], *, loss_type: str, beta: float, options: _Options) -> torch.Tensor:
    """``h`` per pair: the sigmoid argument (dpo, tgdpo, simpo) or the regressed quantity (ipo)."""
    if loss_type == "simpo":
        chosen, rejected = _split_pairs(_length_mean(sums, "policy"))
        return beta * (chosen - rejected) - options.simpo_gamma
    if loss_type == "ipo":
        chosen, rejected = _split_pairs(_length_mean(sums, "logratio"))
        return chosen - rejected
    chosen, rejected = _split_pairs(sums["weighted"] if "weighted" in sums else sums["logratio"])
    return beta * (chosen - rejected)


def _pair_losses(logits: torch.Tensor, *, loss_type: str, beta: float, label_smoothing: float) -> torch.Tensor:
    if loss_type == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _metric_sums(
    sums: dict[str, torch.Tensor], logits: torch.Tensor, *, loss_type: str, beta: float, clamping: bool
) -> MetricSums:
    """``name -> (sum, count)``: per-pair quantities summed over the pairs (count = pairs), token-weight
    statistics summed over response tokens (count = tokens), so that summing over micro-batches and
    ranks before dividing gives the exact global mean whatever the micro-batch composition."""
    with torch.no_grad():
        sums = {key: value.detach() for key, value in sums.items()}
        # SimPO has no reference, so its rewards are its own implicit reward (beta * mean log pi);
        # every other type reports the unweighted DPO reward so DPO/TGDPO/IPO runs are comparable.
        rewards = beta * (_length_mean(sums, "policy") if loss_type == "simpo" else sums["logratio"])
        chosen, rejected = _split_pairs(rewards)
        logps_chosen, logps_rejected = _split_pairs(sums["policy"])
        pairs = torch.full((), float(chosen.shape[0]), dtype=torch.float32, device=chosen.device)
        out: MetricSums = {
            "rewards/chosen": (chosen.sum(), pairs),
            "rewards/rejected": (rejected.sum(), pairs),
            "rewards/accuracy": ((chosen > rejected).to(rewards.dtype).sum(), pairs),
            "rewards/margin": ((chosen - rejected).sum(), pairs),
            "logps/chosen": (logps_chosen.sum(), pairs),
            "logps/rejected": (logps_rejected.sum(), pairs),
            "logits/mean": (logits.detach().sum(), pairs),
        }
        if "weighted" in sums:
            tokens_chosen, tokens_rejected = _split_pairs(sums["tokens"])
            weights_chosen, weights_rejected = _split_pairs(sums["weight_sum"])
            all_tokens = sums["tokens"].sum()
            out["weights/chosen_mean"] = (weights_chosen.sum(), tokens_chosen.sum())
            out["weights/rejected_mean"] = (weights_rejected.sum(), tokens_rejected.sum())
            out["weights/negative_fraction"] = (sums["weight_negative"].sum(), all_tokens)
            if clamping:
                out["weights/clamped_fraction"] = (sums["weight_clamped"].sum(), all_tokens)
        return {name: (total.to(torch.float32), count.to(torch.float32)) for name, (total, count) in out.items()}


@dataclass(frozen=True)
class PreferenceLossSums:
    """One micro-batch's preference loss in summable form (see :func:`preference_loss_sums`)."""

    losses: torch.Tensor  # [P] per-pair losses (differentiable)
    metrics: MetricSums  # name -> (sum, count), detached float32; "loss" included


def preference_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    guide_logps: torch.Tensor | None = None,
    beta: float = DEFAULT_BETA,
    alpha: float = DEFAULT_ALPHA,
    loss_type: str = "tgdpo",
    cp_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss of one micro-batch: mean over its B pairs, plus detached metrics.

    Args:
        policy_logps, ref_logps, guide_logps: per-token log-probs ``[2B, T]`` (float32; float64 is
            accepted too) of the policy, the frozen reference and the frozen guidance model. Rows
            ``0..B-1`` are chosen responses, ``B..2B-1`` rejected; row ``i`` and ``B + i`` are a pair.
            Only ``policy_logps`` is differentiated; the others are treated as constants.
        loss_mask: ``[2B, T]``, nonzero on response tokens, 0 on prompt and padding. Values at masked
            positions never reach the loss, the metrics or the gradients (even inf or nan).
        beta: DPO temperature; TGDPO uses it both in the loss and for the guidance reward.
        alpha: TGDPO guidance strength.
        loss_type: ``"dpo"``, ``"tgdpo"`` (DPO when ``guide_logps`` is None), ``"ipo"`` or ``"simpo"``
            (reference-free: ``ref_logps`` may be None and is ignored).
        cp_group: context-parallel group when each rank holds only its CP shard of every sequence's
            tokens (any token layout); None or a 1-rank group means the full sequences are here.
        options: ``label_smoothing`` (dpo/tgdpo/simpo, in [0, 0.5], default 0), ``weight_clamp``
            (tgdpo, ``(low, high)`` with None for an open side, default None = no clamp, as in the
            paper), ``simpo_gamma`` (simpo, the *absolute* margin gamma, default 0.5),
            ``token_weights`` (tgdpo: ready-made token weights shaped like ``policy_logps``, used as
            constants in place of those computed from ``guide_logps``, which must then be None; the
            guidance plug-ins of ``megatron_tgdpo.guidance`` make them) with ``clamped_tokens`` (bool,
            the tokens a clamp changed, for ``weights/clamped_fraction``). Unknown options raise
            TypeError; options the loss type does not use raise ValueError.

    Per pair, with ``D_t = log pi(y_t) - log ref(y_t)`` summed over response tokens only:

    * dpo: ``h = beta * (sum D_w - sum D_l)``; tgdpo: ``h = beta * (sum f_w D_w - sum f_l D_l)`` with
      the weights of :func:`tgdpo_token_weights`; loss ``-(1-eps) log s(h) - eps log s(-h)``.
    * ipo: ``h = mean D_w - mean D_l`` (length-averaged, as TRL does for IPO); loss ``(h - 1/(2 beta))^2``.
    * simpo: ``h = beta * (mean log pi_w - mean log pi_l) - gamma``; loss as dpo.

    Context parallelism: the per-sequence sums and lengths are SUM-all-reduced over ``cp_group``
    before the loss, with an identity backward, so the returned loss (and every metric) is the exact
    global value on every CP rank, and each rank's backward gives exactly ``d loss / d (its own token
    log-probs)``. The gradient of a model parameter is then the SUM over CP ranks of their backward
    results. The trainer's rule for that (each pair counted once per data-parallel replica, with
    megatron-core's ``calculate_per_token_loss``) is in ``docs/loss.md`` and ``runtime/schedule.py``;
    :func:`preference_loss_sums` is the summable form it uses.

    Returns:
        ``(loss, metrics)``: ``loss`` is 0-dim, the mean over the B pairs; ``metrics`` maps names to
        detached 0-dim float32 tensors (means over the pairs; ``weights/*`` are over response
        tokens): ``rewards/{chosen,rejected,accuracy,margin}``, ``logps/{chosen,rejected}``,
        ``logits/mean`` and, when guidance is active, ``weights/{chosen_mean,rejected_mean,
        negative_fraction}`` plus ``weights/clamped_fraction`` with a clamp. See ``docs/loss.md``.
    """
    out = preference_loss_sums(policy_logps, ref_logps, loss_mask, guide_logps=guide_logps, beta=beta, alpha=alpha,
                               loss_type=loss_type, cp_group=cp_group, **options)
    metrics = {name: total / count.clamp(min=1.0) for name, (total, count) in out.metrics.items() if name != "loss"}
    return out.losses.mean(), metrics


def preference_loss_sums(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    guide_logps: torch.Tensor | None = None,
    beta: float = DEFAULT_BETA,
    alpha: float = DEFAULT_ALPHA,
    loss_type: str = "tgdpo",
    cp_group: dist.ProcessGroup | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    **options: Any,
) -> PreferenceLossSums:
    """:func:`preference_loss` in summable form: the per-pair losses and ``name -> (sum, count)`` metrics.

    What a trainer needs when the number of pairs per micro-batch varies (packed rows): sum the losses,
    count the pairs, divide once for the whole global batch (``docs/loss.md``). With ``sequence_ids``
    (``[R, T]``, the sequence index of each position, -1 for none) and ``num_sequences`` (``2P``), the
    tensors are packed rows and sequence ``i < P`` / ``P + i`` are pair ``i``'s chosen / rejected
    responses; otherwise row ``i`` / ``B + i`` are, as in :func:`preference_loss`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    parsed = _parse_options(loss_type, options)
    beta, alpha = _check_coefficients(beta=beta, alpha=alpha)
    packed = sequence_ids is not None
    if packed and (num_sequences is None or num_sequences < 2 or num_sequences % 2):
        raise ValueError(f"num_sequences must be an even count >= 2 with sequence_ids, got {num_sequences!r}")
    _check_logps("policy_logps", policy_logps, like=None, packed=packed)
    if ref_logps is None and loss_type != "simpo":
        raise ValueError(f"loss_type={loss_type!r} needs ref_logps (only 'simpo' is reference-free)")
    if ref_logps is not None:
        _check_logps("ref_logps", ref_logps, like=policy_logps)
    if guide_logps is not None:
        _check_logps("guide_logps", guide_logps, like=policy_logps)
    response = _check_mask(loss_mask, like=policy_logps)
    if packed and tuple(sequence_ids.shape) != tuple(policy_logps.shape):
        raise ValueError(f"sequence_ids has shape {tuple(sequence_ids.shape)}, expected {tuple(policy_logps.shape)}")

    weights = clamped = None
    guided = loss_type == "tgdpo" and guide_logps is not None
    given = parsed.token_weights
    if given is not None:
        if guide_logps is not None:
            raise ValueError("pass guide_logps or token_weights, not both")
        _check_logps("token_weights", given, like=policy_logps)
        weights = _masked(given.detach(), response)
        clamped = (torch.zeros_like(response) if parsed.clamped_tokens is None
                   else parsed.clamped_tokens.to(torch.bool) & response)
    elif guided:
        weights, clamped = _token_weights(
            guide_logps, ref_logps, response, beta=beta, alpha=alpha, weight_clamp=parsed.weight_clamp,
            num_pairs=num_sequences // 2 if packed else None, sequence_ids=sequence_ids,
        )
    if loss_type == "simpo":
        ref_logps = None  # reference-free; do not sum (or all-reduce) what the loss never uses

    reducer = _per_sequence(sequence_ids, num_sequences) if packed else None
    sums = _sequence_sums(policy_logps, ref_logps, response, weights, clamped, cp_group=cp_group,
                          per_sequence=reducer)
    logits = _pair_logits(sums, loss_type=loss_type, beta=beta, options=parsed)
    losses = _pair_losses(logits, loss_type=loss_type, beta=beta, label_smoothing=parsed.label_smoothing)
    metrics = _metric_sums(
        sums, logits, loss_type=loss_type, beta=beta,
        clamping=(guided and parsed.weight_clamp is not None) or parsed.clamped_tokens is not None,
    )
    pairs = torch.full((), float(losses.shape[0]), dtype=torch.float32, device=losses.device)
    metrics["loss"] = (losses.detach().sum().to(torch.float32), pairs)
    return PreferenceLossSums(losses=losses, metrics=metrics)
