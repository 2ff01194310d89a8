"""Joining queued tasks' feeds along axis 0 and cutting the outputs back (dynamic batching).

The engine batches payloads it cannot read through this :class:`~ezrt.engine.batching.Batcher`:
two requests may share a run when every input is an ndarray and the two agree on input
names, dtypes and every dim but the first, on the outputs they fetch, and neither carries
run options. Results are cut back along axis 0 into arrays that own their memory, as an
unbatched run's would.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, List, Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .specs import TensorSpec, format_shape

__all__ = ["FeedBatcher", "check_batchable"]


def check_batchable(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Dynamic batching needs a free leading (batch) axis on every input and output."""
    for side, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            shape = spec.shape
            if spec.dtype is None or not shape or isinstance(shape[0], int):
                described = "unknown" if shape is None else format_shape(shape)
                raise InvalidArgumentError(
                    "max_batch_size needs a model whose inputs and outputs are tensors with a "
                    f"free leading (batch) axis; {side} '{spec.name}' is {spec.type} with "
                    f"shape {described}"
                )


class FeedBatcher:
    """Batches requests whose inputs are a dict of name -> ndarray (the ORT backend's)."""

    def __init__(self, input_names: Sequence[str], make_request: Callable[..., Any]) -> None:
        self._names = tuple(input_names)
        self._make = make_request  # make_request(inputs, fetch) -> a request

    def key(self, payload: Any) -> Optional[Hashable]:
        if payload.run_options is not None:
            return None
        inputs = payload.inputs
        if type(inputs) is not dict or len(inputs) != len(self._names):
            return None
        described = []
        for name in self._names:
            value = inputs.get(name)
            if type(value) is not np.ndarray or not value.ndim:
                return None
            described.append(value.dtype)
            described.append(value.shape[1:])
        return (payload.fetch, *described)

    def size(self, payload: Any) -> int:
        return int(payload.inputs[self._names[0]].shape[0])

    def combine(self, payloads: Sequence[Any]) -> Any:
        joined = {
            name: np.concatenate([payload.inputs[name] for payload in payloads], axis=0)
            for name in self._names
        }
        return self._make(joined, payloads[0].fetch)

    def split(self, result: Any, sizes: Sequence[int]) -> List[Any]:
        total = sum(sizes)
        for output in result:
            if not isinstance(output, np.ndarray) or output.ndim == 0 or len(output) != total:
                raise ValueError("an output does not follow the batch axis")  # rerun alone
        per_task: List[List[np.ndarray]] = [[] for _ in sizes]
        for output in result:
            start = 0
            for parts, size in zip(per_task, sizes):
                stop = start + size
                parts.append(output[start:stop].copy())  # owns its memory, as unbatched
                start = stop
        return per_task
