"""Placeholder: filled in by the surface's own module (issue 11)."""

from __future__ import annotations

from typing import Any

HANDLERS: list[Any] = []
