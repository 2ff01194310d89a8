"""Outputs: which ones a call asks for, how they are arranged, how batches are joined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = ["ALL_OUTPUTS", "OutputNames", "OutputSelection", "concat_batch"]


@dataclass(frozen=True)
class OutputSelection:
    """Which outputs to fetch and how to arrange them.

    ``fetch`` are distinct names to ask the backend for (None = all, model order);
    ``picks`` maps each requested position to an index into the fetched list (None when the
    request is exactly ``fetch``). A name asked for twice yields two independent arrays.
    """

    fetch: Optional[Tuple[str, ...]]
    picks: Optional[Tuple[int, ...]] = None

    def arrange(self, fetched: List[Any]) -> List[Any]:
        """The fetched outputs in the order (and multiplicity) the caller asked for."""
        if self.picks is None:
            return fetched
        seen = set()
        arranged = []
        for index in self.picks:
            value = fetched[index]
            if index in seen and isinstance(value, np.ndarray):
                value = value.copy()
            seen.add(index)
            arranged.append(value)
        return arranged


ALL_OUTPUTS = OutputSelection(None)


class OutputNames:
    """Resolves a call's ``output_names`` against the model's outputs."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}

    def select(self, output_names: Any) -> OutputSelection:
        """Resolve ``output_names``: None or empty means all outputs (as onnxruntime)."""
        if output_names is None:
            return ALL_OUTPUTS
        if isinstance(output_names, (str, bytes)) or not isinstance(output_names, Sequence):
            raise InvalidTypeError(
                "output_names must be a sequence or None "
                f"(got {type(output_names).__name__}: {output_names!r}; "
                "for one output write [name])"
            )
        if len(output_names) == 0:
            return ALL_OUTPUTS
        fetch: List[str] = []
        picks: List[int] = []
        for name in output_names:
            if not isinstance(name, str):
                raise InvalidTypeError(
                    f"output_names must contain strings (got {type(name).__name__}: {name!r})"
                )
            if name not in self._index:
                raise InvalidArgumentError(
                    f"Unknown output name: {name} (model outputs: {', '.join(self.names)})"
                )
            if name not in fetch:
                fetch.append(name)
            picks.append(fetch.index(name))
        exact = len(fetch) == len(picks)
        return OutputSelection(tuple(fetch), None if exact else tuple(picks))


def concat_batch(outputs: List[List[Any]]) -> List[Any]:
    """Join per-sample outputs along axis 0 (rank-0 outputs are stacked into shape (B,))."""
    joined = []
    for per_sample in zip(*outputs):
        first = per_sample[0]
        if isinstance(first, np.ndarray) and first.ndim == 0:
            joined.append(np.stack(per_sample))
        else:
            joined.append(np.concatenate(per_sample, axis=0))
    return joined
