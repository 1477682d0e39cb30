"""What every trainer shares: set-up, the schedule wrapper, metrics, the loop, stop handling.

``setup`` (data, architecture, models, the device chosen once) -> ``loop.Trainer`` drives an
:class:`~megatron_tgdpo.runtime.algorithm.Algorithm` (``step``, ``evaluate``, the stateful parts to
checkpoint, the frozen roles it needs) through megatron-core's schedules (``schedule``), with
``signals`` (preemption, launcher death, requeue) and ``save_dir`` (the lock and the requeue marker).
See ``docs/architecture.md``.
"""
