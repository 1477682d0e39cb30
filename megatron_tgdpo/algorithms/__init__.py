"""Training methods on the shared runtime: preference (DPO, TGDPO, IPO, SimPO), SFT, PPO."""
