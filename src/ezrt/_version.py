"""ezrt's version: the one place it is written (pyproject.toml reads it from here).

A literal, not ``importlib.metadata.version("ezrt")``: reading the installed metadata cost
about 45 ms of every ``import ezrt``.
"""

from __future__ import annotations

__version__ = "0.1.0"
