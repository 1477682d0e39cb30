"""The allow-listed unpicklers and the manifest's own digest, without a checkpoint.

Each payload writes a marker file when it is unpickled; the plain loaders (``trust_checkpoints``)
run it, which shows the payload is live and the refusal is what stopped it."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_tgdpo import integrity, safe_pickle


class _Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@pytest.fixture
def trusting():
    def set_to(enabled: bool) -> None:
        safe_pickle.trust_checkpoints(enabled)
    yield set_to
    safe_pickle.trust_checkpoints(False)


def _metadata() -> Metadata:
    props = TensorProperties(dtype=torch.bfloat16)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))
    return Metadata(state_dict_metadata={"w": TensorStorageMetadata(props, torch.Size([2, 3]), [chunk])})


def test_dcp_metadata_reads_back_through_the_allow_list():
    value = safe_pickle.load_pickle(io.BytesIO(pickle.dumps(_metadata())), source="m")
    md = value.state_dict_metadata["w"]
    assert md.properties.dtype is torch.bfloat16 and md.size == torch.Size([2, 3])
    assert md.properties.layout is torch.strided


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_payload_in_a_plain_pickle_is_refused_naming_the_file(tmp_path, trusting, protocol):
    marker = tmp_path / "ran"
    data = pickle.dumps({"index": _metadata(), "x": _Payload(marker)}, protocol=protocol)
    with pytest.raises(safe_pickle.PickleRefusedError, match=r"^ckpt/\.metadata: refused to unpickle builtins\.exec"):
        safe_pickle.load_pickle(io.BytesIO(data), source="ckpt/.metadata")
    assert not marker.exists()
    trusting(True)
    safe_pickle.load_pickle(io.BytesIO(data), source="ckpt/.metadata")
    assert marker.exists()


def test_a_payload_in_a_torch_file_is_refused_and_numpy_rng_state_is_not(tmp_path, trusting):
    marker = tmp_path / "ran"
    state = {"numpy": np.random.RandomState(3).get_state(), "torch": torch.get_rng_state(), "python": (3, (1, 2), None)}
    buffer = io.BytesIO()
    torch.save([state], buffer)
    back = safe_pickle.torch_load(io.BytesIO(buffer.getvalue()), source="rng")
    assert np.array_equal(back[0]["numpy"][1], state["numpy"][1]) and torch.equal(back[0]["torch"], state["torch"])
    buffer = io.BytesIO()
    torch.save([{**state, "x": _Payload(marker)}], buffer)
    with pytest.raises(safe_pickle.PickleRefusedError, match=r"^c/common\.pt: refused to unpickle builtins\.exec"):
        safe_pickle.torch_load(io.BytesIO(buffer.getvalue()), source="c/common.pt")
    assert not marker.exists()
    trusting(True)
    safe_pickle.torch_load(io.BytesIO(buffer.getvalue()), source="c/common.pt")
    assert marker.exists()


def test_garbage_is_unreadable_not_a_traceback():
    noise = np.random.default_rng(0).bytes(512)
    with pytest.raises(safe_pickle.UnreadablePickleError, match=r"^m: not a readable pickle"):
        safe_pickle.load_pickle(io.BytesIO(noise), source="m")
    with pytest.raises(safe_pickle.UnreadablePickleError, match=r"^t: not a readable torch file"):
        safe_pickle.torch_load(io.BytesIO(noise), source="t")


def test_the_manifest_digest_covers_every_field():
    sealed = integrity.seal({"iteration": 10, "consumed_samples": 80, "files": {"a": {"bytes": 1}}, "x": 0.1})
    assert integrity.seal_problem(sealed, path="m") is None
    for field, value in (("iteration", 7), ("consumed_samples", 0), ("files", {}), ("x", 0.2)):
        assert "does not match its manifest_sha256" in integrity.seal_problem({**sealed, field: value}, path="m")
    assert "has no manifest_sha256" in integrity.seal_problem({"iteration": 1}, path="m")
