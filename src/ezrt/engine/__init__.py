"""The backend-agnostic engine: admission, dispatch, workers, delivery (see ``core.py``)."""

from .core import Engine, EngineConfig, Runner, Task

__all__ = ["Engine", "EngineConfig", "Runner", "Task"]
