"""One global batch ahead: the next step's host work (reading, packing, collating) runs while this step computes.

:class:`Prefetcher` wraps a batch source (anything with ``next_global_batch()``) and asks it for the
next global batch in one background thread as soon as the current one is handed out, so the training
step finds it ready. The source is only ever called from that one thread, one call at a time, in
order: the batches and their order are exactly the unwrapped source's, and a resumed run (a fresh
source built from the checkpoint's consumed-samples count) sees what an uninterrupted one would. An
error raised while preparing a batch surfaces at the step that asks for that batch, as without the
prefetch. Nothing is prepared beyond the ``remaining`` batches the run will take.

On CPU the thread overlaps the step's compute where torch releases the GIL (the matrix multiplies);
on a GPU it overlaps everything the host does not wait for.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

__all__ = ["Prefetcher"]


class Prefetcher:
    """``next_global_batch()`` of ``source``, one call ahead in a background thread; at most ``remaining``
    calls in all."""

    def __init__(self, source: Any, *, remaining: int):
        self.source = source
        self.remaining = remaining
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None

    def next_global_batch(self) -> Any:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            batches = pending.result()  # re-raises what preparing this batch raised
        else:
            batches = self.source.next_global_batch()
        self.remaining -= 1
        if self.remaining > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
            self._pending = self._pool.submit(self.source.next_global_batch)
        else:
            self.close()
        return batches

    def close(self) -> None:
        """Stop the thread (after the batch it may be preparing); the source is not called again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None
