"""Custom-op plugins of an RKNPU2 session: loaded, checked for duplicates, registered.

A plugin is a shared library (``librkcst_*.so``) exporting ``get_rknn_custom_op``, which
returns one ``rknn_custom_op`` struct. The plugins of a session come from
``custom_op_paths`` (a failure raises) and, with ``custom_op_default_path``, from every
``librkcst_*.so`` in the default directory (a failure warns and skips that file). Two
plugins defining the same op (type, version, target) are refused. The libraries stay loaded
as long as the :class:`Plugin` objects do: the contexts that registered them keep those.

Warnings point at the line that built the session (:func:`ezrt.errors.warn`).
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ...errors import EzrtError, EzrtWarning, InvalidArgumentError, warn
from . import abi

__all__ = ["CUSTOM_OP_SIZE", "Plugin", "load_plugins", "register_custom_ops"]

CUSTOM_OP_SIZE = 832  # sizeof(rknn_custom_op)


class Plugin(NamedTuple):
    """One loaded plugin library and the address of the op it defines."""

    path: str
    library: ctypes.CDLL
    address: int  # of its rknn_custom_op struct, inside ``library``


def load_plugins(paths: Sequence[str], default_dir: Optional[str]) -> List[Plugin]:
    """The plugins at ``paths``, then (``default_dir`` not None) those found there; called
    by the backend's ``__init__``."""
    plugins = []
    for path in paths:  # a loop, not a comprehension: that would add a frame before 3.12
        plugins.append(_load_plugin(path))
    if default_dir is not None:
        plugins += _load_directory(default_dir)
    _check_unique(plugins)
    return plugins


def _load_directory(directory: str) -> List[Plugin]:
    """Every ``librkcst_*.so`` in ``directory``; one that fails to load is skipped, warned."""
    if not os.path.isdir(directory):
        warn(f"Default plugin directory does not exist: {directory}", EzrtWarning)
    plugins = []
    for path in sorted(glob.glob(os.path.join(directory, "librkcst_*.so"))):
        try:
            plugins.append(_load_plugin(path))
        except EzrtError as exc:
            warn(f"Failed to load plugin {os.path.basename(path)}: {exc}", EzrtWarning)
    return plugins


def _load_plugin(path: str) -> Plugin:
    try:
        library = ctypes.CDLL(path)
    except OSError as exc:
        warn(
            f"dlopen {path} fail: {exc} "
            "(this could lead to a crash due to internal bugs of rknnrt)",
            EzrtWarning,
        )
        raise InvalidArgumentError(f"dlopen {path} fail: {exc}") from exc
    entry = getattr(library, "get_rknn_custom_op", None)
    if entry is None:
        raise InvalidArgumentError(f"dlsym fail for get_rknn_custom_op: {path} does not export it")
    entry.restype = ctypes.c_void_p
    entry.argtypes = []
    address = entry()
    if not address:
        raise InvalidArgumentError(f"get_rknn_custom_op returned null ({path})")
    return Plugin(path, library, int(address))


def _check_unique(plugins: List[Plugin]) -> None:
    """Refuse two plugins defining the same op type, version and target."""
    seen: Dict[Tuple[bytes, int, int], str] = {}
    for path, _, address in plugins:
        raw = ctypes.string_at(address, CUSTOM_OP_SIZE)
        version, target = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
        op_type = raw[8:264].split(b"\0", 1)[0]
        key = (op_type, version, target)
        if key in seen:
            raise InvalidArgumentError(
                f"Duplicate custom op definition detected: {op_type.decode()} "
                f"(version={version}, target={target}) from {path} (first from {seen[key]})"
            )
        seen[key] = path


def register_custom_ops(rt: abi.Runtime, plugins: Sequence[Plugin], contexts: List[int]) -> None:
    """``rknn_register_custom_ops`` of every plugin's op, on each of ``contexts``."""
    register = rt.optional("rknn_register_custom_ops")
    ops = ctypes.create_string_buffer(CUSTOM_OP_SIZE * len(plugins))
    for i, plugin in enumerate(plugins):
        ctypes.memmove(ctypes.addressof(ops) + i * CUSTOM_OP_SIZE, plugin.address, CUSTOM_OP_SIZE)
    for ctx in contexts:
        abi.check("rknn_register_custom_ops", register(ctx, ops, len(plugins)))
