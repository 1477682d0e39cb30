"""RoPE at given positions for shared-prompt rows, through megatron-core's own thd RoPE.

megatron-core's ``GPTModel`` builds its rotary table from a length and its thd RoPE restarts the
positions in every ``cu_seqlens`` segment. A shared-prompt row (``docs/data.md``) needs the response
segments to *continue* their prompt's positions. megatron's thd RoPE also takes a table with one
entry per row position when its length equals the row's (``rope_utils._apply_rotary_pos_emb_thd``,
"CASE 1": position ``offset + i`` of the table for token ``i`` of a segment starting at ``offset``), so
giving it the table indexed by the row's ``position_ids`` rotates every token at its own position.

:func:`install_row_positions` does that with two hooks on one model chunk: before the chunk's forward
it notes the ``rope_positions`` of the ``packed_seq_params`` it is called with (only
:class:`~megatron_tgdpo.data.packed_params.RowSeqParams` of shared-prompt rows have them), and the
rotary module's output is replaced by ``table[rope_positions]`` for that call. Any other call (rows
layout, plain packed rows, generation) is left exactly as megatron computes it.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["install_row_positions"]


def install_row_positions(model: torch.nn.Module) -> None:
    """Hook ``model`` (a ``GPTModel`` chunk) so that shared-prompt rows get RoPE at their positions."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    pending: dict[str, Any] = {}

    def note(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        params = kwargs.get("packed_seq_params")
        pending["positions"] = getattr(params, "rope_positions", None)

    def forget(*_: Any) -> None:
        pending.pop("positions", None)

    def at_positions(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
        positions = pending.get("positions")
        if positions is None or not isinstance(output, torch.Tensor):
            return None
        # The table covers max_seqlen positions, which packed_seq_params_for sizes to the longest
        # prompt + response span (no device-to-host check here: it would sync every forward).
        return output.index_select(0, positions.to(output.device))

    model.register_forward_pre_hook(note, with_kwargs=True)
    model.register_forward_hook(forget)
    rotary.register_forward_hook(at_positions)
