"""Reading megatron-core torch_dist checkpoints one tensor region at a time.

A torch_dist checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory whose keys are megatron's
ShardedTensor keys. Transformer layers are stacked: ``decoder.layers.self_attention.linear_qkv.weight``
has global shape ``[num_layers, rows, cols]`` whatever TP/PP saved it, with TP shards (and the two halves
of the SwiGLU ``linear_fc1``) stored as separate chunks; the norms use TransformerEngine names
(``linear_qkv.layer_norm_weight``). We read one layer's region at a time, in a single process without
``torch.distributed``: DCP's resharding helper lists the saved chunks overlapping the region, and each
chunk (one ``torch.save`` record inside a ``.distcp`` file, located by the checkpoint metadata) is loaded
and copied into place. A region held by a single chunk (a TP=1 save) is returned as loaded, without a
second copy. Memory: the region plus one saved chunk, never the model.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from megatron_tgdpo import safe_pickle
from megatron_tgdpo.convert.errors import ConversionError
from megatron_tgdpo.convert.layout import LAYER_ALIASES, megatron_shapes
from megatron_tgdpo.convert.views import ConcatRows, Range, TensorView
from megatron_tgdpo.models.llama import LlamaArch

_LAYER_PREFIX = "decoder.layers."


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


class _Window(io.RawIOBase):
    """A seekable read-only view of bytes ``[offset, offset + length)`` of an open file."""

    def __init__(self, fh, offset: int, length: int):
        self._fh, self._start, self._length, self._pos = fh, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class _IntoTensor:
    """Minimal DCP load planner: every read item lands in a slice of one destination tensor."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, read_item) -> torch.Tensor:
        return _narrow(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:  # only tensors are requested
        raise ConversionError(f"unexpected non-tensor item {read_item.dest_index.fqn}")


class TorchDistCheckpoint:
    """One torch_dist checkpoint directory: tensor metadata, and reads of boxes of a tensor."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        try:
            self._reader = FileSystemReader(str(self.path))
            # Not the reader's read_metadata (a plain pickle.load): the allow-listed unpickler.
            with open(self.path / ".metadata", "rb") as handle:
                self.metadata = safe_pickle.load_pickle(handle, source=str(self.path / ".metadata"))
        except safe_pickle.UnreadablePickleError as exc:
            raise ConversionError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - DCP raises assorted errors for a broken directory
            raise ConversionError(f"{self.path}: not a readable torch_dist checkpoint ({exc})") from exc
        self._reader.set_up_storage_reader(self.metadata, True)
        self._cache: tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """key -> (global shape, dtype) for every tensor in the checkpoint."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if hasattr(md, "chunks"):
                out[key] = (tuple(md.size), md.properties.dtype)
        return out

    def _load_chunk(self, storage_index) -> torch.Tensor:
        info = self.metadata.storage_data[storage_index]
        with open(self.path / info.relative_path, "rb") as fh:
            return torch.load(_Window(fh, info.offset, info.length), map_location="cpu", weights_only=True)

    def read_box(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata[key]
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [box])
        if sum(int(torch.Size(item.lengths).numel()) for item in items) != torch.Size(sizes).numel():
            raise ConversionError(
                f"{self.path}: {key} has no saved data for part of {offsets}+{sizes}; incomplete checkpoint"
            )
        if any(self.metadata.storage_data[item.storage_index].transform_descriptors for item in items):
            # Stored with a transform (e.g. compression): let DCP's reader decode it.
            dest = torch.empty(sizes, dtype=md.properties.dtype)
            plan = self._reader.prepare_global_plan([self._reader.prepare_local_plan(LoadPlan(items))])[0]
            self._reader.read_data(plan, _IntoTensor(dest)).wait()
            return dest
        if len(items) == 1 and tuple(items[0].lengths) == tuple(sizes):
            chunk = self._load_chunk(items[0].storage_index)  # one chunk holds the region: no second copy
            return _narrow(chunk, items[0].storage_offsets, items[0].lengths)
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        for item in items:
            chunk = self._load_chunk(item.storage_index)
            _narrow(dest, item.dest_offsets, item.lengths).copy_(_narrow(chunk, item.storage_offsets, item.lengths))
            del chunk  # before loading the next one
        return dest

    def layer(self, key: str, layer: Optional[int]) -> torch.Tensor:
        """The whole tensor (``layer`` None) or one layer of a stacked tensor; the last one is cached,
        because the HF tensors of a layer are row ranges of the same megatron tensor."""
        if self._cache[0] == (key, layer):
            return self._cache[1]
        self._cache = (None, None)  # drop the old region before reading the next
        size = self.metadata.state_dict_metadata[key].size
        if layer is None:
            value = self.read_box(key, (0,) * len(size), tuple(size))
        else:
            value = self.read_box(key, (layer,) + (0,) * (len(size) - 1), (1, *size[1:]))[0]
        self._cache = ((key, layer), value)
        return value


class TorchDistView(TensorView):
    def __init__(self, ckpt: TorchDistCheckpoint, key: str, layer: Optional[int], shape, dtype):
        self.ckpt, self.key, self.layer, self.shape, self.dtype = ckpt, key, layer, tuple(shape), dtype
        self.label = f"{key}{'' if layer is None else f'[layer {layer}]'} in {ckpt.path}"

    def read(self, *, rows: Range = None, cols: Range = None) -> torch.Tensor:
        value = self.ckpt.layer(self.key, self.layer)
        if rows is not None:
            value = value[rows[0] : rows[1]]
        if cols is not None:
            value = value[:, cols[0] : cols[1]]
        return value


def _candidates(suffix: str) -> list[str]:
    return [suffix] + ([LAYER_ALIASES[suffix]] if suffix in LAYER_ALIASES else [])


def torch_dist_views(ckpt: TorchDistCheckpoint, arch: LlamaArch, *, arch_source: str) -> dict[str, TensorView]:
    """megatron full name -> lazy view into the checkpoint, checked against ``arch``'s shapes."""
    found = ckpt.tensors()
    views: dict[str, TensorView] = {}
    missing, wrong = [], []

    def match(key: str, layer: Optional[int], shape: tuple[int, ...]) -> Optional[TensorView]:
        if key not in found:
            return None
        got, dtype = found[key]
        want = shape if layer is None else (arch.num_layers, *shape)
        if got != want:
            wrong.append(f"{key}: checkpoint {got} != {want}")
            return None
        return TorchDistView(ckpt, key, layer, shape, dtype)

    for name, shape in megatron_shapes(arch).items():
        view = None
        if name.startswith(_LAYER_PREFIX):
            index, suffix = name[len(_LAYER_PREFIX) :].split(".", 1)
            i = int(index)
            for s in _candidates(suffix):
                view = match(_LAYER_PREFIX + s, i, shape) or match(f"{_LAYER_PREFIX}{i}.{s}", None, shape)
                if view is None and s == "mlp.linear_fc1.weight":
                    # megatron's "singleton local shards" variant saves the SwiGLU halves as _w / _v
                    half = (shape[0] // 2, *shape[1:])
                    w = match(_LAYER_PREFIX + s + "_w", i, half) or match(f"{_LAYER_PREFIX}{i}.{s}_w", None, half)
                    v = match(_LAYER_PREFIX + s + "_v", i, half) or match(f"{_LAYER_PREFIX}{i}.{s}_v", None, half)
                    if w is not None and v is not None:
                        view = ConcatRows([(w, 0, half[0]), (v, 0, half[0])], label=f"{name} in {ckpt.path}")
                if view is not None:
                    break
        else:
            view = match(name, None, shape)
        if view is None:
            missing.append(name)
        else:
            views[name] = view
    if wrong:
        raise ConversionError(
            f"{ckpt.path}: tensor shapes do not match the architecture from {arch_source}:\n  "
            + "\n  ".join(wrong[:8])
            + "\npass the config.json of the model that was trained (--hf-config)"
        )
    if missing:
        model_keys = sorted(k for k in found if k.startswith(("embedding.", "decoder.", "output_layer.")))
        hint = ""
        if "output_layer.weight" in missing:
            hint = " (tie_word_embeddings is false but there is no output_layer.weight)"
        raise ConversionError(
            f"{ckpt.path}: missing {len(missing)} model tensors, e.g. {missing[:3]}{hint}; "
            f"model tensors present: {model_keys[:10]}"
        )
    return views
