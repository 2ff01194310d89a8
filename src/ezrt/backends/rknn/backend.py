"""The RKNPU2 backend: one librknnrt context per worker, each pinned to its NPU core.

:class:`RknnBackend` is the session's side of the protocol; it composes the parts that do
the work, each handed what it needs:

* :mod:`.contexts`: every context of the session, made (init or dup, core mask, custom
  ops) and destroyed, with weight sharing's lifetime;
* :mod:`.plugins`: custom-op libraries, loaded and checked before any context;
* :mod:`.model`: the model's tensors and versions, read from the first context;
* :mod:`.worker`: the workers and the copy path they run;
* :mod:`.bound` and :mod:`.native`: zero copy (``OrtValue`` / ``IOBinding``): the native
  tensors it binds, the NPU memory it makes or imports, bound runs.

Every copy-path context is created up front, in the constructing thread. If anything fails
half-way, every context already made is destroyed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ...errors import EzrtWarning, warn
from ...io import ModelMetadata, NodeArg
from ...options import SessionConfig
from ..base import Backend
from . import abi
from .bound import RknnZeroCopy
from .contexts import Contexts, check_schedule
from .model import INPUT_DTYPES, ModelInfo, read_model
from .native import native_arg
from .plugins import load_plugins
from .worker import PERF_ENV, CopyPath, RknnWorker, perf_enabled
from .zerocopy import BoundRun, ZeroCopyModel

__all__ = ["DEFAULT_PLUGIN_DIR", "INPUT_DTYPES", "PERF_ENV", "RknnBackend", "RknnWorker"]

#: Where ``custom_op_default_path`` looks for ``librkcst_*.so`` plugins.
DEFAULT_PLUGIN_DIR = "/usr/lib/rknpu/op_plugins/"


class RknnBackend(Backend):
    """One .rknn model on the NPU, with a context per worker."""

    @property
    def feed_layout(self) -> str:
        """The FeedParser must not transform layouts: this backend reports the caller's
        shapes and converts itself (the runtime accepts NCHW or NHWC for 4-D inputs)."""
        return "nchw"

    def __init__(
        self,
        model: bytes,
        config: SessionConfig,
        *,
        share_with: Optional[RknnBackend] = None,
        runtime: Optional[abi.Runtime] = None,
        given_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.config = config
        self._given_options = dict(given_options or {})
        check_schedule(config)
        self.rt = runtime or abi.load_runtime()
        if config.wants_custom_ops:  # said first, as upstream: even if loading then fails
            warn(
                "Custom op loading requested; dup_context is disabled for this session to "
                "avoid known RKNN stability issues.",
                EzrtWarning,
            )
        plugins = []
        if config.wants_custom_ops:
            default_dir = DEFAULT_PLUGIN_DIR if config.custom_op_default_path else None
            plugins = load_plugins(config.custom_op_paths, default_dir)
        lender = share_with.contexts if share_with is not None else None
        #: This session's contexts (a ``use_weight_from`` session borrows their weights).
        self.contexts: Contexts = Contexts(
            self.rt, model, config, self, lender=lender, plugins=plugins
        )
        try:
            self.model_info: ModelInfo = read_model(self.rt, self.contexts.open_first().ctx, config)
            self.contexts.open_workers(config.threads_per_core * len(config.routes))
        except BaseException:
            self.contexts.destroy_all()
            raise
        self.inputs = self.model_info.inputs
        self.outputs = self.model_info.outputs
        self.output_index = self.model_info.output_index
        self._copy_path = CopyPath(self.rt, self.model_info, perf_enabled())
        self._zero_copy = RknnZeroCopy(self, self.rt, self.contexts, self.model_info, config)
        self.contexts.borrow()

    # ------------------------------------------------------------------ the protocol

    def make_worker(self, core: Optional[int], slot: int) -> RknnWorker:
        return RknnWorker(self._copy_path, self._zero_copy, self.contexts.slots[slot], slot, core)

    def check_shapes(self, arrays: Sequence[np.ndarray]) -> None:
        """Dynamic models: the shapes must be one of the combinations the model allows."""
        self.model_info.check_shapes(arrays)

    def metadata(self) -> ModelMetadata:
        custom = self.model_info.custom_string
        return ModelMetadata(
            producer_name="rknn",
            custom_metadata_map={"rknn_custom_string": custom} if custom else {},
        )

    def providers(self) -> List[str]:
        """As upstream 0.11: the canonical name, even when the alias was asked for."""
        return ["RKNPU2ExecutionProvider"]

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        """As upstream 0.11: the options as the caller gave them (a copy, not the object)."""
        return {"RKNPU2ExecutionProvider": dict(self._given_options)}

    @property
    def runtime_path(self) -> str:
        """The librknnrt file (or loader name) this session uses."""
        return self.rt.path

    @property
    def closed(self) -> bool:
        return self.contexts.closed

    def native_inputs(self) -> List[NodeArg]:
        """Inputs as zero copy binds them: native dims, type, layout and strides."""
        return [native_arg(spec) for spec in self.zero_copy.inputs]

    def native_outputs(self) -> List[NodeArg]:
        """Outputs as zero copy binds them: native dims, type, layout and strides."""
        return [native_arg(spec) for spec in self.zero_copy.outputs]

    # ------------------------------------------------------------------ zero copy

    @property
    def zero_copy(self) -> ZeroCopyModel:
        """This session's tensors as zero copy sees them (queried on first use)."""
        return self._zero_copy.view()

    def bound_payload(self, binding: Any, run_options: Any = None) -> BoundRun:
        """The engine payload for ``run_with_iobinding``: checked and frozen on the caller's
        thread, run by whichever worker takes it (:meth:`RknnWorker.run`)."""
        from .binding import bound_payload

        return bound_payload(binding, self)

    def io_binding(self, session: Any) -> Any:
        """A new SessionIOBinding for ``session`` (which it keeps alive)."""
        from .binding import RknnIOBinding

        self.contexts.check_open()
        return RknnIOBinding(session, self)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free zero-copy memory, then destroy the contexts; a session whose weights others
        borrow keeps its contexts until they close."""
        if self.contexts.close():
            self._zero_copy.free_memories()
        self.contexts.release()
