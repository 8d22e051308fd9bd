"""Mapping functions for reading MIS exports (registered into the one registry in functions.py)."""

from __future__ import annotations
