"""What the session needs of a backend: the base class every backend derives from.

A backend opens one model and reports its tensors and metadata; it makes one worker per
(core, slot), *in the worker's own thread* (so a worker can pin itself before it builds
native state). A worker runs one request at a time and is used by its thread alone.
The engine never imports a backend and a backend never imports the engine.

Everything a backend may or may not offer is declared here, with the default answer, so
the session asks a backend directly instead of probing it with ``hasattr``.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np

from ..errors import EzrtError
from ..io import FeedParser, NodeArg, OrtFeed, TensorSpec
from ..options import SessionConfig

__all__ = ["Backend", "Request", "Worker"]


class Request(NamedTuple):
    """One task's payload: the inputs as the backend's feed parser made them (a tuple of
    arrays in model order, or ONNX Runtime's feed dict), the outputs to fetch (None = all)
    and the caller's run options (ONNX Runtime only)."""

    inputs: Any
    fetch: Optional[Sequence[str]]
    run_options: Any = None


class Worker(Protocol):
    """Runs requests on one thread (made in that thread)."""

    def run(self, request: Any) -> List[Any]:
        """Run one request; return the fetched outputs in ``request.fetch`` order."""
        ...

    def close(self) -> None: ...


class Backend:
    """One opened model and what its workers need. Subclasses fill in the rest."""

    #: The validated ezrt options this backend was opened with.
    config: SessionConfig
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    # ------------------------------------------------------------------ required

    def make_worker(self, core: Optional[int], slot: int) -> Worker:
        """A worker for ``core`` (None: no particular core), called in its own thread."""
        raise NotImplementedError

    def metadata(self) -> Any:
        """The model's metadata (ONNX Runtime's own object on that backend)."""
        raise NotImplementedError

    def providers(self) -> List[str]:
        """The execution providers in use, as ONNX Runtime names them."""
        raise NotImplementedError

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        """The providers' own options."""
        raise NotImplementedError

    def close(self) -> None:
        """Release native state once every worker has stopped."""

    # ------------------------------------------------------------------ optional

    @property
    def name(self) -> str:
        """How error messages name this backend."""
        return type(self).__name__

    @property
    def feed_layout(self) -> str:
        """The layout the feed parser converts from (``layout`` unless the backend converts
        inputs itself)."""
        return self.config.layout

    def make_feed(self) -> Union[FeedParser, OrtFeed]:
        """The parser that turns a caller's feed into this backend's request inputs."""
        return self.batch_feed()

    def batch_feed(self) -> FeedParser:
        """The parser of batch dispatch (``ztu_modelrt_dispatch_batch``): always arrays."""
        names = [spec.name for spec in self.outputs]
        return FeedParser(self.inputs, names, self.feed_layout, self.check_shapes)

    def check_shapes(self, arrays: Sequence[np.ndarray]) -> None:
        """Backend-specific validation of a parsed feed (e.g. allowed dynamic shapes)."""

    def request_inputs(self, arrays: Sequence[np.ndarray]) -> Any:
        """Request inputs from arrays in model order (batch dispatch builds its own)."""
        return tuple(arrays)

    def input_args(self, user_shapes: Sequence[Any]) -> List[Any]:
        """The inputs as the caller sees them (``user_shapes``: after ezrt's layout)."""
        return [
            NodeArg(spec.name, shape, spec.type, spec.layout, spec.strides)
            for spec, shape in zip(self.inputs, user_shapes)
        ]

    def output_args(self) -> List[Any]:
        """The outputs as the caller sees them."""
        return [
            NodeArg(spec.name, spec.shape, spec.type, spec.layout, spec.strides)
            for spec in self.outputs
        ]

    def native_inputs(self) -> List[Any]:
        """The inputs as the runtime holds them (layouts, strides where it has them)."""
        return self.input_args([spec.shape for spec in self.inputs])

    def native_outputs(self) -> List[Any]:
        """The outputs as the runtime holds them."""
        return self.output_args()

    def lone_runner(self) -> Any:
        """A runner for a waiting caller's task on the caller's own thread when a worker's
        place is free (None: every task goes to a worker). Its ``run_alone``, if any, is
        used when the engine is idle."""
        return None

    def make_batcher(self) -> Any:
        """The :class:`~ezrt.engine.batching.Batcher` of dynamic batching
        (``max_batch_size`` > 1)."""
        raise self.unavailable("max_batch_size (dynamic batching)")

    def io_binding(self, session: Any) -> Any:
        """A zero-copy input/output binding for ``session``."""
        raise self.unavailable("io_binding")

    def bound_payload(self, binding: Any, run_options: Any) -> Any:
        """The engine payload that runs ``binding`` on a worker, or None when bound runs
        run directly on the calling thread (:meth:`run_bound`)."""
        return None

    def run_bound(self, binding: Any, run_options: Any) -> None:
        """Run ``binding`` on the calling thread (zero-copy inputs and outputs)."""
        raise self.unavailable("run_with_iobinding")

    def set_providers(self, providers: Any, provider_options: Any) -> None:
        """Change the execution providers (the session rebuilds its workers after)."""
        raise self.unavailable("set_providers")

    @property
    def ort_session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` holding the weights (None off ORT)."""
        return None

    def unavailable(self, what: str) -> EzrtError:
        """The error for a feature this backend does not have."""
        return EzrtError(f"{what} is not available on the {self.name} backend")
