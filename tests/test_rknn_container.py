"""The RKNN container reader: every byte string is a description or a clear error.

Issue 16 item 3: valid JSON with a wrong-typed field (``norm_tensor`` null / 0 / "x",
``dtype`` 1.5, ``tensor_id`` [], 100k-deep nesting...) used to raise ``TypeError`` /
``AttributeError`` / ``RecursionError``. The reader now checks every field it uses and raises
:class:`ezrt.InvalidArgumentError` "<file> is not a valid RKNN model: field '<path>' ...".
A hypothesis test mutates the JSON *structure* (types, nesting, missing keys), not only bytes.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from typing import Any, List, Tuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ezrt
from ezrt.backends.rknn.container import RknnContainer, parse_container

BASE = {
    "name": "rknn model",
    "version": "1.6.1-source_code",
    "ori_network_platform": "ONNX",
    "target_platform": ["rk3588"],
    "norm_tensor": [
        {"tensor_id": 0, "url": "image", "size": [1, 3, 4, 4], "dtype": {"vx_type": "int8"}},
        {"tensor_id": 1, "url": "scores", "size": [1, 8], "dtype": {"vx_type": "float"}},
    ],
    "graph": [
        {"left": "input", "right": "norm_tensor", "right_tensor_id": 0},
        {"left": "output", "right": "norm_tensor", "right_tensor_id": 1},
    ],
}


def container(description: Any = BASE, *, raw: bytes = b"", version: int = 6) -> bytes:
    payload = b"\x10\0\0\0RKNN" + bytes(8)
    text = raw or json.dumps(description).encode()
    header = b"RKNN\0\0\0\0" + struct.pack("<QQ", version, len(payload)) + bytes(40)
    return header + payload + struct.pack("<Q", len(text)) + text


def test_a_valid_description():
    found = parse_container(container(), "m.rknn")
    assert found.format_version == 6 and found.target_platforms == ["rk3588"]
    assert [(t.name, t.shape, t.dtype) for t in found.inputs] == [("image", [1, 3, 4, 4], "int8")]
    assert [t.name for t in found.outputs] == ["scores"]
    assert "  input image: int8 [1, 3, 4, 4]" in found.describe()


def _with(path: Tuple[Any, ...], value: Any) -> bytes:
    description = copy.deepcopy(BASE)
    target: Any = description
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return container(description)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("norm_tensor",), None, r"field 'norm_tensor' must be a list \(got null\)"),
        (("norm_tensor",), 0, r"field 'norm_tensor' must be a list \(got int\)"),
        (("norm_tensor",), "x", r"field 'norm_tensor' must be a list \(got str\)"),
        (("norm_tensor", 0), "x", r"field 'norm_tensor\[0\]' must be an object"),
        (("norm_tensor", 0, "dtype"), 1.5, r"field 'norm_tensor\[0\]\.dtype' must be an object"),
        (("norm_tensor", 0, "dtype"), {"vx_type": 1.5}, r"'norm_tensor\[0\]\.dtype\.vx_type'"),
        (("norm_tensor", 0, "tensor_id"), [], r"'norm_tensor\[0\]\.tensor_id' must be an integer"),
        (
            ("norm_tensor", 0, "tensor_id"),
            True,
            r"'norm_tensor\[0\]\.tensor_id' must be an integer",
        ),
        (("norm_tensor", 1, "size"), [1, "8"], r"field 'norm_tensor\[1\]\.size\[1\]' must be an"),
        (("norm_tensor", 1, "url"), None, r"'norm_tensor\[1\]\.url' must be a string"),
        (("graph",), {"left": "input"}, "field 'graph' must be a list"),
        (("graph", 1), None, r"field 'graph\[1\]' must be an object"),
        (("graph", 0, "right_tensor_id"), "0", r"'graph\[0\]\.right_tensor_id' must be an int"),
        (("target_platform",), [3588], r"field 'target_platform\[0\]' must be a string"),
        (("version",), 1.6, "field 'version' must be a string"),
    ],
)
def test_wrong_typed_fields_name_the_field(path, value, message):
    with pytest.raises(
        ezrt.InvalidArgumentError, match=r"m\.rknn is not a valid RKNN model: .*" + message
    ):
        parse_container(_with(path, value), "m.rknn")


def test_missing_fields_are_fine_and_other_documents_are_not():
    assert parse_container(container({})).inputs == []
    assert parse_container(container({"target_platform": "rk3566"})).target_platforms == ["rk3566"]
    for raw, message in [
        (b"[1, 2]", "its JSON description must be an object"),
        (b"{", "its JSON description does not parse"),
        (b"\xff\xfe{}", "its JSON description does not parse"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    ]:
        with pytest.raises(ezrt.InvalidArgumentError, match=message):
            parse_container(container(raw=raw))


def test_headers_that_do_not_fit():
    good = container()
    for data, message in [
        (b"RKNN", "4 bytes is too small for the header"),
        (b"ONNX" + bytes(60), "no RKNN magic"),
        (good[:8] + struct.pack("<Q", 99) + good[16:], "unknown container version 99"),
        (good[:40], "does not fit"),
        (good[:-5], "JSON description does not fit"),
    ]:
        with pytest.raises(ezrt.InvalidArgumentError, match=message):
            parse_container(data)
    assert parse_container(b"CYPTRKNN" + bytes(32)).encrypted
    rknx = parse_container(b"RKNX" + bytes(10), "models/net.rknn")
    assert rknx.family == "RKNPU3" and rknx.weight_file == "models/net.weight"
    assert "weight file: models/net.weight (missing)" in "\n".join(rknx.describe())


# ---------------------------------------------------------------- structure mutations

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(["tensor_id", "size", "dtype", "left", "x"]), children, max_size=4
        ),
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*prefix, index))
    return found


PATHS = _paths(BASE)
mutations = st.lists(
    st.tuples(
        st.sampled_from(PATHS),
        st.sampled_from(["replace", "delete", "wrap", "nest", "empty"]),
        json_values,
        st.integers(1, 3000),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(description: Any, path: Tuple[Any, ...], how: str, value: Any, depth: int) -> None:
    target = description
    for key in path[:-1]:
        in_dict = isinstance(target, dict) and key in target
        in_list = isinstance(target, list) and isinstance(key, int) and key < len(target)
        if in_dict or in_list:
            target = target[key]
        else:
            return  # an earlier mutation removed this path
    last = path[-1]
    if isinstance(target, dict) and last not in target and how != "replace":
        return
    if isinstance(target, list) and not (isinstance(last, int) and last < len(target)):
        return
    if not isinstance(target, (dict, list)):
        return
    if how == "delete":
        del target[last]
    elif how == "replace":
        target[last] = value
    elif how == "wrap":
        target[last] = [target[last]]
    elif how == "empty":
        target[last] = type(target[last])() if isinstance(target[last], (dict, list)) else ""
    else:  # bury the value deep inside lists
        nested: Any = target[last]
        for _ in range(depth):
            nested = [nested]
        target[last] = nested


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(changes=mutations)
def test_mutated_json_structure_is_a_description_or_a_clear_error(changes):
    description = copy.deepcopy(BASE)
    for path, how, value, depth in changes:
        _mutate(description, path, how, value, depth)
    try:
        data = container(description)
    except (ValueError, RecursionError):  # json.dumps itself gives up: nothing to test
        event("not serialisable")
        return
    try:
        found = parse_container(data, "mutated.rknn")
    except ezrt.InvalidArgumentError as exc:
        assert str(exc).startswith("mutated.rknn is not a valid RKNN model: "), str(exc)
        event("refused")
        return
    assert isinstance(found, RknnContainer)
    assert all(isinstance(line, str) for line in found.describe())
    event("accepted")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cut=st.integers(0, len(container()) - 1), flip=st.integers(0, 255))
def test_truncated_or_flipped_bytes(cut, flip):
    data = bytearray(container())
    for candidate in (
        bytes(data[:cut]),
        bytes(data[:cut]) + bytes([flip]) + bytes(data[cut + 1 :]),
    ):
        try:
            found = parse_container(candidate)
        except ezrt.InvalidArgumentError:
            continue  # a clear error: fine
        assert isinstance(found, RknnContainer)


def test_ezrt_info_prints_one_line_for_a_bad_file(tmp_path):
    bad = tmp_path / "bad.rknn"
    bad.write_bytes(_with(("norm_tensor",), None))
    out = subprocess.run(
        [sys.executable, "-m", "ezrt", "info", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"ezrt: {bad} is not a valid RKNN model: field 'norm_tensor' must be a list (got null)"
    ]
