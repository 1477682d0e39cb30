"""megatron-core's ``PackedSeqParams`` plus what the host already knows about a packed row.

Every attention layer of a forward pass receives the same params object. Carrying the segment bounds
as host ints (``bounds``) spares each layer a device-to-host copy of ``cu_seqlens``; ``plans`` lets the
first layer that needs a derived structure (the local attention's gather indices and mask) build it
once per micro-batch for all layers. ``prefix_of`` and ``rope_positions`` describe a shared-prompt row
(``docs/data.md``, "Shared prompts"): which segment's keys a segment also attends to, and the RoPE
position of every row position when they do not restart per segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

__all__ = ["RowSeqParams"]


@dataclass
class RowSeqParams(PackedSeqParams):
    """thd ``PackedSeqParams`` of one packed row, with host-side facts about it (see the module docstring)."""

    #: ``cu_seqlens`` as host ints (the same values as the tensor fields)
    bounds: tuple[int, ...] = ()
    #: per segment: the index of the segment whose keys precede its own keys (its shared prompt), or -1
    prefix_of: tuple[int, ...] = ()
    #: ``[row]`` RoPE positions of the full row (shared prompts only; None: restart per segment)
    rope_positions: Optional[torch.Tensor] = None
    #: per-micro-batch structures built by the first layer that needs them, reused by the others
    plans: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
