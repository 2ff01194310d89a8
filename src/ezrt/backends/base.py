"""The protocol between the session and a backend.

A backend opens one model and reports its tensors and metadata; it makes one worker per
(core, slot), *in the worker's own thread* (so a worker can pin itself before it builds
native state). A worker runs one request at a time and is used by its thread alone.
The engine never imports a backend and a backend never imports the engine.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..io import ModelMetadata, TensorSpec


class Request(NamedTuple):
    """One task's payload: input arrays in model order, and the outputs to fetch (None = all)."""

    inputs: Tuple[np.ndarray, ...]
    fetch: Optional[Tuple[str, ...]]


class Worker(Protocol):
    def run(self, request: Request) -> List[Any]:
        """Run one request; return the fetched outputs in ``request.fetch`` order."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def metadata(self) -> ModelMetadata: ...

    def providers(self) -> List[str]: ...

    def provider_options(self) -> Dict[str, Dict[str, Any]]: ...

    def make_worker(self, core: Optional[int], slot: int) -> Worker: ...

    def close(self) -> None: ...
