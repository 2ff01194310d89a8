"""What a library owes its host program: filterable warnings, a quiet logger, a licence."""

from __future__ import annotations

import ast
import logging
import pathlib
import warnings

import ezrt
from ezrt.errors import EzrtRuntimeWarning

SRC = pathlib.Path(ezrt.__file__).parent
ROOT = pathlib.Path(__file__).resolve().parents[1]


def warn_calls():
    """Every ``warnings.warn(...)`` and ``warn(...)`` (ezrt.errors.warn) call in ezrt, except
    the one inside ``warn`` itself, which passes its caller's category on."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            direct = isinstance(func, ast.Name) and func.id == "warn"
            qualified = (
                isinstance(func, ast.Attribute)
                and func.attr == "warn"
                and isinstance(func.value, ast.Name)
                and func.value.id == "warnings"
            )
            forwarding = path.name == "errors.py" and qualified
            if (direct or qualified) and not forwarding:
                yield path, node


def test_warnings_point_at_the_callers_line():
    from ezrt.errors import warn

    def inside_ezrt():  # a stand-in for a frame inside the package
        warn("from deep inside", ezrt.EzrtWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside_ezrt()
    assert [w.filename for w in caught] == [__file__]


def test_every_ezrt_warning_has_an_ezrt_category():
    calls = list(warn_calls())
    assert calls, "no warnings.warn call found: the scan is broken"
    for path, call in calls:
        category = call.args[1] if len(call.args) > 1 else None
        category = category or next((k.value for k in call.keywords if k.arg == "category"), None)
        assert isinstance(category, ast.Name), f"{path.name}:{call.lineno} has no category"
        assert category.id in ("EzrtWarning", "EzrtRuntimeWarning"), (path.name, call.lineno)


def test_ezrt_warnings_can_be_filtered_alone():
    assert issubclass(ezrt.EzrtWarning, UserWarning)
    assert issubclass(EzrtRuntimeWarning, ezrt.EzrtWarning)
    assert issubclass(EzrtRuntimeWarning, RuntimeWarning)  # old filters keep working
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ezrt.EzrtWarning)
        warnings.warn("from ezrt", EzrtRuntimeWarning, stacklevel=1)
        warnings.warn("from someone else", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["from someone else"]


def test_the_ezrt_logger_has_a_null_handler():
    handlers = logging.getLogger("ezrt").handlers
    assert any(isinstance(handler, logging.NullHandler) for handler in handlers)


def test_the_licence_text_ships_beside_the_code():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_the_package_knows_its_submodules():
    # ezrt's module __getattr__ forwards unknown names to onnxruntime; a submodule name must
    # never be one of them (``from . import x`` asks the package first).
    import pkgutil

    import ezrt

    found = {module.name for module in pkgutil.iter_modules(ezrt.__path__)}
    assert found - {"__main__"} == set(ezrt.SUBMODULES)
