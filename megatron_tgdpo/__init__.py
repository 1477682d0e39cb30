"""megatron_tgdpo: DPO and token-level reward-guided DPO (TGDPO) on megatron-core."""
__version__ = "0.1.0"
