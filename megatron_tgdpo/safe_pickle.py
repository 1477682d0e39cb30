"""Reading pickled checkpoint files without running code: only the classes a checkpoint holds.

A pickle names the callables that rebuild its objects, and unpickling calls them: a crafted file can
run any command. torch_dist checkpoints hold three kinds of pickles, each read here through an
allow-list and refused, with the file named, when it names anything else:

* ``.metadata`` (``torch.distributed.checkpoint``'s index of the shards; torch reads it with a plain
  ``pickle.load``): :func:`load_pickle`, a ``pickle.Unpickler`` whose ``find_class`` admits only the
  DCP metadata and planner classes, ``torch.Size``, the dtypes, the tensor layout and memory format.
* ``common.pt`` and the byte items inside ``.distcp`` files (RNG state, optimizer parameter groups,
  TransformerEngine extra state; torch's default load planner reads them with
  ``torch.load(weights_only=False)``): :func:`torch_load`, torch's own ``weights_only`` unpickler
  (tensors, containers, primitives) plus numpy's arrays and dtypes, which the RNG state holds.

``trust_checkpoints(True)`` (``--trust-checkpoint``) turns both into the plain loaders, for a
checkpoint that holds something else and comes from a source the user trusts.
"""
from __future__ import annotations

import io
import pickle
import re
from typing import IO, Any

import torch

from megatron_tgdpo import compat

__all__ = [
    "PickleRefusedError",
    "UnreadablePickleError",
    "load_pickle",
    "torch_load",
    "trust_checkpoints",
    "trusted",
]

TRUST_FLAG = "--trust-checkpoint"
_TRUSTED = False


class UnreadablePickleError(ValueError):
    """A pickled file that cannot be read: not a pickle, cut short, or (subclass) refused."""


class PickleRefusedError(UnreadablePickleError):
    """A pickled file names a class or function outside the allow-list: it was not loaded."""


def trust_checkpoints(enabled: bool) -> None:
    """Process-wide: ``True`` reads pickles with the plain loaders (``--trust-checkpoint``)."""
    global _TRUSTED
    _TRUSTED = bool(enabled)


def trusted() -> bool:
    return _TRUSTED


def _refusal(source: str, what: str) -> PickleRefusedError:
    return PickleRefusedError(
        f"{source}: refused to unpickle {what}, which a checkpoint does not hold (the file may be crafted to "
        f"run code); nothing from it was loaded. Load it only if you trust where it came from: {TRUST_FLAG}")


# ----------------------------------------------------------------------------------------------
# plain pickles: torch.distributed.checkpoint's .metadata
# ----------------------------------------------------------------------------------------------

_DCP = "torch.distributed.checkpoint"
_METADATA_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),  # rebuilds torch.strided & co. from their names
    ("collections", "OrderedDict"),
    *((module, name) for module in ("builtins", "__builtin__")  # protocols < 3 spell it __builtin__
      for name in ("set", "frozenset", "slice", "complex")),
})


def _metadata_class_allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    # dtypes, layouts and memory formats pickle as attributes of the torch module (torch.bfloat16)
    return module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], *, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if _metadata_class_allowed(module, name):
            return super().find_class(module, name)
        raise _refusal(self._source, f"{'builtins' if module == '__builtin__' else module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _refusal(self._source, f"a persistent reference ({type(pid).__name__})")


def load_pickle(file: IO[bytes], *, source: str) -> Any:
    """Unpickle ``file`` (``source`` names it in errors) admitting only checkpoint-metadata classes."""
    if _TRUSTED:
        return pickle.load(file)
    try:
        return _RestrictedUnpickler(file, source=source).load()
    except UnreadablePickleError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle raises many types for a garbled stream
        raise UnreadablePickleError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------
# torch.save files: common.pt, byte items of .distcp files
# ----------------------------------------------------------------------------------------------


def _numpy_globals() -> list:
    """What ``np.random.get_state()`` (saved with the RNG state) needs: arrays and their dtypes, under
    the names numpy 1 and numpy 2 pickle them with."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    out: list = [np.ndarray, np.dtype, io.BytesIO,
                 (_reconstruct, "numpy.core.multiarray._reconstruct"),
                 (_reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [cls for cls in vars(dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return out


_GLOBAL_NAMED = re.compile(r"GLOBAL ([\w.]+)")
_WEIGHTS_ONLY_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+)")


def torch_load(file: IO[bytes] | str, *, source: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` through torch's ``weights_only`` unpickler plus numpy arrays (``source`` names
    the file in errors)."""
    if _TRUSTED:
        return torch.load(file, map_location=map_location, weights_only=False)
    try:
        with compat.torch_safe_globals(_numpy_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        named = _GLOBAL_NAMED.search(text)
        if named:  # torch names builtins without their module
            name = named.group(1)
            raise _refusal(source, name if "." in name else f"builtins.{name}") from None
        detail = _WEIGHTS_ONLY_DETAIL.search(text)
        raise UnreadablePickleError(f"{source}: not a readable torch file "
                                    f"({detail.group(1).strip() if detail else text.splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001 - a cut or garbled zip archive raises assorted errors
        raise UnreadablePickleError(f"{source}: not a readable torch file ({type(exc).__name__}: {exc})") from None
