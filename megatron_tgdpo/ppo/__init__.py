"""``python -m megatron_tgdpo.ppo``: PPO with dense DPO token rewards (RTO) on megatron-core.

``cli`` is the trainer's command line (``__main__`` runs it); ``compare`` is the sparse-PPO vs RTO vs
DPO comparison on a verifier task (``python -m megatron_tgdpo.ppo.compare``). See ``docs/rto.md``.
"""
