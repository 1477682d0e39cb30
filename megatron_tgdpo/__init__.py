"""megatron_tgdpo: DPO and token-level reward-guided DPO (TGDPO) on megatron-core."""
import warnings as _warnings

# megatron-core announces at import time, on every rank, that it falls back to torch implementations
# when apex / TransformerEngine are absent (always so on CPU; apex is optional here by design).
_warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed")

__version__ = "0.1.0"
