"""The backend-agnostic engine: admission, workers, delivery."""

from .core import Engine, EngineConfig, Runner, Task

__all__ = ["Engine", "EngineConfig", "Runner", "Task"]
