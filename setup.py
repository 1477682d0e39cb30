"""Install megatron_tgdpo: DPO / TGDPO preference optimisation on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_tgdpo",
    version="0.1.0",
    description="Token-level reward-guided DPO (TGDPO) and DPO on megatron-core, at cluster scale",
    packages=find_packages(include=["megatron_tgdpo", "megatron_tgdpo.*"]),
    # Shipped data (megatron_tgdpo/resources): the built-in synthetic set and its tokenizer, read at run time.
    package_data={"megatron_tgdpo.resources": ["synthetic/*.jsonl", "synthetic/*.model"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the installer (CPU wheel on dev/CI machines, CUDA wheel on clusters).
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "psutil",  # megatron-core dist_checkpointing needs it without declaring it
        "pyyaml",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "jinja2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "transformers>=4.45", "matplotlib", "wandb", "gguf>=0.16", "scipy"],
        # GGUF model files (llama.cpp) as a model source: dequantization
        "gguf": ["gguf>=0.16"],
        "plot": ["matplotlib"],
        # tools/bench_vs_trl.py: DPO side by side with TRL's DPOTrainer, at the TRL version last measured
        "bench": ["trl==1.16.0", "transformers>=4.56.2"],
        # GPU only: TransformerEngine with its torch extension (FP8 layers, CP attention).
        "te": ["transformer-engine[pytorch]"],
        "tensorboard": ["tensorboard"],
        # --wandb-project: Weights & Biases logging (offline without an API key)
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": [
        "megatron-tgdpo=megatron_tgdpo.cli:main",  # megatron-tgdpo <command>; --help lists them
        "megatron-tgdpo-train=megatron_tgdpo.train:main",  # = megatron-tgdpo train
    ]},
)
