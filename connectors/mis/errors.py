"""Errors the MIS connectors raise about their input.

Hierarchy::

    MisInputError        base: something about a MIS export cannot be used
    └── FileRefused      the whole file is refused; nothing from it may be applied (`.reason` says why)
        ├── CtfRefused   a Common Transfer File (CTF XML) refused by connectors.mis.ctf
        └── CsvRefused   a CSV export refused by connectors.mis.csv (`.format`: 'csv:<layout>' once known)

A bad *record* is not an error: readers quarantine it and go on. `reason` is written for a data manager and
never carries file content (no names, UPNs, dates of birth, entity text or parser excerpts), so it is safe in
logs, task logs and the run report. Readers raise these `from None` so no parser message rides along as
`__cause__`.
"""

from __future__ import annotations


class MisInputError(Exception):
    """Base class for problems with a MIS export."""


class FileRefused(MisInputError):
    """A whole file is refused: move it aside and apply nothing from it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CtfRefused(FileRefused):
    """A Common Transfer File is refused."""


class CsvRefused(FileRefused):
    """A CSV export is refused. `format` is 'csv:<layout>' when the layout was recognised, else 'csv'."""

    def __init__(self, reason: str, format: str = "csv") -> None:
        super().__init__(reason)
        self.format = format
