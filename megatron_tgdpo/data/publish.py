"""Write a data set under a temporary name, then publish it by renaming, manifest last.

The staging directory is a hidden sibling of the output (same file system, so ``os.replace`` is an
atomic rename). Publishing first removes any old manifest, then moves ``.bin`` and ``.idx``, then the
manifest: at every instant either no manifest exists or it describes the files beside it. A crash
leaves at most a ``.NAME.tmp-*`` directory, which no reader mistakes for a data set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from megatron_tgdpo.data.manifest import bin_path, idx_path, manifest_path

__all__ = ["StagedOutput"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedOutput:
    """``with StagedOutput(prefix) as out:`` write to ``out.stage_prefix``; call ``out.publish()``.
    Leaving the block without publishing (an exception, a validation failure) removes everything."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        if not self.prefix.name:
            raise ValueError(f"output prefix {str(prefix)!r} names a directory; give a prefix such as data/train")
        parent = self.prefix.parent
        missing = []
        probe = parent
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._created_dirs = missing  # removed again on discard, deepest first, if still empty
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.prefix.name}.tmp-", dir=parent))
        self.stage_prefix = self.dir / self.prefix.name
        self._done = False

    def publish(self) -> None:
        staged = [bin_path(self.stage_prefix), idx_path(self.stage_prefix), manifest_path(self.stage_prefix)]
        final = [bin_path(self.prefix), idx_path(self.prefix), manifest_path(self.prefix)]
        for path in staged:
            _fsync(path)
        if final[2].exists():
            final[2].unlink()  # unpublish the old data set before touching its files
        for src, dst in zip(staged, final):
            os.replace(src, dst)
        _fsync(self.prefix.parent)
        self.dir.rmdir()
        self._done = True

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for directory in self._created_dirs:
            try:
                directory.rmdir()
            except OSError:
                break
        self._done = True

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.discard()
