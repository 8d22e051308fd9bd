"""Exceptions of the core, one hierarchy.

    SchoolslinkError                 base of everything we raise on purpose
    ├── ConfigurationError           bad agreement, mapping or setting: fix the file, then re-run
    │   └── AgreementError
    ├── PermanentDataError           bad data: quarantine the record or refuse the file, go on
    ├── DecisionRefused              a review decision the governance rules do not allow (CLI exit 1)
    └── TransientError               a peer was slow or down (timeouts, 429, 5xx): retry later

Messages carry pseudonymous keys and positions (`pupil#17`), never names, NHS numbers, UPNs or dates
of birth.
"""

from __future__ import annotations


class SchoolslinkError(Exception):
    """Base of every error raised on purpose by schoolslink."""


class ConfigurationError(SchoolslinkError):
    """A configuration file (agreement, mapping, setting) is wrong."""


class AgreementError(ConfigurationError):
    """An agreement file is invalid."""


class PermanentDataError(SchoolslinkError):
    """Input that will never succeed as it is: quarantine it with the reason."""


class DecisionRefused(SchoolslinkError):
    """A person's decision (e.g. `match review confirm`) that the rules refuse; the message says why."""


class TransientError(SchoolslinkError):
    """A peer failed in a way that may pass: retry with back-off."""
