"""Building and driving the C doubles of librknnrt (RKNPU2) and librknn3_api (RKNPU3).

The tests compile the doubles with the system C compiler (``$CC``, ``cc`` or ``gcc``) and
skip with a clear reason without one. A :class:`Double` exposes a loaded double's counters
and its log of broken rules (memory destroyed twice, used after destroy or with another
context, cache syncs missing or misdirected, sizes or strides that do not match the tensor,
two threads on one context...): the fixtures assert that a test left none behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import shutil
import subprocess
import threading
from typing import Any, Dict, Iterator, Tuple

import pytest

HERE = pathlib.Path(__file__).parent
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
#: Why the NPU tests are skipped on a machine without a C compiler.
NO_CC = "needs a C compiler (cc, gcc or $CC) to build the C doubles of librknnrt and librknn3_api"
needs_cc = pytest.mark.skipif(CC is None, reason=NO_CC)

# rknn_tensor_type / rknn_tensor_format (RKNPU2)
F32, F16, I8, U8, I16, U16, I32, U32, I64, BOOL = range(10)
NCHW, NHWC, NC1HWC2, UNDEF = 0, 1, 2, 3

_built: Dict[str, str] = {}
_build_lock = threading.Lock()


def compile_double(source: str, out: pathlib.Path, *flags: str) -> str:
    """Compile one double into a shared library (once per process and flags)."""
    key = f"{source}|{' '.join(flags)}"
    with _build_lock:
        if key in _built and os.path.exists(_built[key]):
            return _built[key]
        out.parent.mkdir(parents=True, exist_ok=True)
        assert CC is not None
        command = [CC, "-shared", "-fPIC", "-O2", "-Wall", *flags, "-o", str(out)]
        subprocess.run(
            [*command, str(HERE / source), "-lm", "-lpthread"],
            check=True,
            capture_output=True,
        )
        _built[key] = str(out)
        return str(out)


@pytest.fixture(scope="session")
def doubles(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """Paths of the compiled doubles: the current runtime, a 1.4.0-like one, two custom-op
    plugins, and the RKNPU3 runtime."""
    if CC is None:
        pytest.skip(NO_CC)
    build = tmp_path_factory.getbasetemp() / "npu-doubles"
    return {
        "current": compile_double("fake_rknnrt.c", build / "librknnrt.so"),
        "old": compile_double(
            "fake_rknnrt.c", build / "old" / "librknnrt.so", "-DFAKE_RKNN_OLD_RUNTIME"
        ),
        "plugin": compile_double("plugin.c", build / "librkcst_myop.so", '-DPLUGIN_OP_TYPE="MyOp"'),
        "plugin2": compile_double(
            "plugin.c", build / "librkcst_other.so", '-DPLUGIN_OP_TYPE="Other"'
        ),
        "rknpu3": compile_double("fake_rknn3.c", build / "librknn3_api.so"),
    }


class Double:
    """A loaded double: its counters and its violation log (``prefix`` picks the family)."""

    def __init__(self, path: str, prefix: str = "fake_rknn") -> None:
        self.lib = ctypes.CDLL(path)
        self._counter = getattr(self.lib, f"{prefix}_counter")
        self._counter.restype = ctypes.c_long
        self._counter.argtypes = [ctypes.c_char_p]
        self._violations = getattr(self.lib, f"{prefix}_violations")
        self._violations.restype = ctypes.c_long
        self._violations.argtypes = [ctypes.c_char_p, ctypes.c_long]
        self._reset = getattr(self.lib, f"{prefix}_reset")

    def __getitem__(self, name: str) -> int:
        value = int(self._counter(name.encode()))
        assert value != -999, f"the double has no counter {name!r}"
        return value

    def violations(self) -> str:
        """The log of broken rules ("" when none)."""
        buffer = ctypes.create_string_buffer(16384)
        count = self._violations(buffer, len(buffer))
        return buffer.value.decode() if count else ""

    def reset(self) -> None:
        self._reset()

    def assert_clean(self) -> None:
        """No context or memory left alive, no rule broken."""
        assert self.violations() == "", "the double recorded violations:\n" + self.violations()
        assert self["live"] == 0, "a context leaked"
        assert self["mems_live"] == 0, "NPU memory leaked"


@pytest.fixture
def npu(doubles: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Double]:
    """The RKNPU2 double as the session's runtime; clean on entry and checked on exit."""
    monkeypatch.setenv("ZTU_RKNPU2_RUNTIME_LIBRARY", doubles["current"])
    double = Double(doubles["current"])
    double.reset()
    yield double
    double.assert_clean()
    assert double["outputs_alloc"] == double["outputs_free"]


@pytest.fixture
def npu3(doubles: Dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Double]:
    """The RKNPU3 double as the session's runtime; checked on exit."""
    monkeypatch.setenv("ZTU_RKNPU3_RUNTIME_LIBRARY", doubles["rknpu3"])
    double = Double(doubles["rknpu3"], "fake_rknn3")
    double.reset()
    yield double
    double.assert_clean()


def fake_model(*lines: str) -> bytes:
    """An RKNPU2 model for the double (see fake_rknnrt.c for the directives)."""
    return b"RKNN\0\0\0\0" + b"FAKE-RKNN\n" + "\n".join(lines).encode() + b"\n"


def fake_rknx(*lines: str) -> bytes:
    """An RKNPU3 model for the double (see fake_rknn3.c)."""
    return b"RKNX\0\0\0\0" + b"FAKE-RKNX\n" + "\n".join(lines).encode() + b"\n"


WEIGHTS = b"FAKE-WEIGHT for the RKNPU3 double\n"


def memfd_holds(name: str) -> Tuple[int, int]:
    """(open descriptors, mappings) this process has of the memfd called ``name`` (Linux):
    what a test counts to see that ezrt let go of its dup and mapping of a dma-buf."""
    tag = f"/memfd:{name} "  # the kernel names it "/memfd:NAME (deleted)"
    fds = 0
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used, now closed
            fds += tag in os.readlink(f"/proc/self/fd/{entry}")
    with open("/proc/self/maps") as maps:
        mapped = sum(tag in line for line in maps)
    return fds, mapped


class ContendedLock:
    """A stand-in for a context slot's lock in a race test: :attr:`contended` is set once a
    thread other than the one that made it starts to wait for the lock (close, say, for the
    context that the test's own thread holds while it allocates)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._maker = threading.get_ident()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking and threading.get_ident() != self._maker:
            self.contended.set()
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()
