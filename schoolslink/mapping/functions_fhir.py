"""Mapping functions for reading FHIR resources (registered into the one registry in functions.py)."""

from __future__ import annotations
