"""What every trainer shares: set-up, the Trainer, the schedule wrapper, metrics, the loop, stop handling.

``trainer.Trainer`` runs an :class:`~megatron_tgdpo.runtime.algorithm.Algorithm` (its config section,
iterations, ``train_step``, evaluation, the stateful parts to checkpoint, the frozen roles it needs):
the one set-up sequence (``setup``: data, architecture, models, the device chosen once), resume,
``step`` through megatron-core's schedules (``schedule``), ``evaluate`` and ``save``. ``loop`` only
schedules those, with ``signals`` (preemption, launcher death, requeue) and ``save_dir`` (the lock and
the requeue marker). See ``docs/architecture.md``.
"""
