"""Where tests find shared inputs that live outside the repository.

The corpora (public synthetic sample files, see their README) sit beside the repository, in
../shared/corpora relative to the repository root.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
