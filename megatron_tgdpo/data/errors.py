"""Exceptions of the data pipeline: each says what is wrong and what to do about it."""
from __future__ import annotations

from typing import Sequence

__all__ = ["BadRecordsError", "DataFormatError", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer or chat template cannot be loaded or does not fit the requested use."""


class DataFormatError(ValueError):
    """Prepared files are missing, incomplete, corrupt, or of an unknown format version."""


class BadRecordsError(ValueError):
    """Input records failed validation under ``--on-bad-record error``; nothing was written.

    ``problems`` holds every problem found (one per bad record, in input order); the message lists
    the first ``max_shown`` of them and says how many more there are.
    """

    def __init__(self, problems: Sequence[object], *, max_shown: int = 20) -> None:
        self.problems = list(problems)
        shown = [f"  {p}" for p in self.problems[:max_shown]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"  ... and {more} more")
        noun = "record" if len(self.problems) == 1 else "records"
        super().__init__(
            f"{len(self.problems)} bad {noun} in the input; nothing was written:\n"
            + "\n".join(shown)
            + "\nFix the records, or pass --on-bad-record skip to leave them out "
            "(they are then counted by reason in the manifest)."
        )
