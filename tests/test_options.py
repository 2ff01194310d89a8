"""Provider options: every key, its coercions, defaults and error messages."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import ezrt
from ezrt.options import SUPPORTED_KEYS, parse_provider_options, split_provider_options


def parse(options):
    config, foreign = parse_provider_options(options)
    assert foreign == {}
    return config


def test_defaults_match_upstream():
    config = parse(None)
    assert (config.layout, config.zero_copy_layout) == ("nchw", "nhwc")
    assert (config.max_queue_size, config.threads_per_core, config.submit_timeout_ms) == (
        3,
        1,
        10000,
    )
    assert config.sequential_callbacks is True
    assert config.schedule is None and config.tp_mode is None and config.tp_mask == 0
    assert config.enable_pacing is False and config.disable_dup_context is False
    assert config.custom_op_paths == () and config.custom_op_default_path is False
    assert config.routes == (None,)


@pytest.mark.parametrize("key", ["max_queue_size", "threads_per_core", "submit_timeout_ms"])
@pytest.mark.parametrize(
    "value, expected",
    [(5, 5), ("7", 7), (" 8 ", 8), ("+9", 9), (np.int64(4), 4), (True, 1)],
)
def test_int_options_accept_ints_numeric_strings_and_numpy_ints(key, value, expected):
    assert getattr(parse({key: value}), key) == expected


@pytest.mark.parametrize("key", ["max_queue_size", "threads_per_core", "submit_timeout_ms"])
@pytest.mark.parametrize("value", [0, -1, "0", "-3"])
def test_int_options_must_be_positive(key, value):
    with pytest.raises(ezrt.InvalidArgumentError, match=f"{key} must be > 0"):
        parse({key: value})


@pytest.mark.parametrize("value", [2.5, None, [1], "3.0", "0x10", "3a", ""])
def test_int_options_reject_non_integers_and_say_what_was_given(value):
    with pytest.raises(RuntimeError, match=r"max_queue_size must be an integer \(got ") as info:
        parse({"max_queue_size": value})
    assert isinstance(info.value, (ValueError, TypeError))


@pytest.mark.parametrize("key", ["sequential_callbacks", "enable_pacing", "disable_dup_context"])
@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        (0, False),
        (2, True),
        ("yes", True),
        (" ON ", True),
        ("false", False),
        ("0", False),
        (np.bool_(True), True),
    ],
)
def test_bool_options(key, value, expected):
    assert getattr(parse({key: value}), key) is expected


@pytest.mark.parametrize("value", ["maybe", 1.0, None, [True]])
def test_bool_options_reject_other_values(value):
    with pytest.raises(RuntimeError, match="enable_pacing must be a boolean"):
        parse({"enable_pacing": value})


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, (1,)),
        ("0,1,2", (0, 1, 2)),
        ("[0, 1, 2]", (0, 1, 2)),
        ("0 1 2", (0, 1, 2)),
        ([2, 0, 2], (2, 0, 2)),
        ((0, "1"), (0, 1)),
        (np.int64(3), (3,)),
        ([np.int32(1)], (1,)),
    ],
)
def test_schedule_forms(value, expected):
    config = parse({"schedule": value})
    assert config.schedule == expected
    assert config.routes == tuple(sorted(set(expected)))


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, "schedule values must be >= 0"),
        ("0,-1", "schedule values must be >= 0"),
        ([], "schedule must not be empty"),
        ("", "schedule must not be empty"),
        ("0,x", "schedule must contain integers"),
        (1.5, "schedule must be an integer, string, or sequence"),
        (None, "schedule must be an integer, string, or sequence"),
        ([0, 1.5], "schedule must be an integer"),
        ({"a": 1}, "schedule must be an integer, string, or sequence"),
    ],
)
def test_schedule_errors(value, message):
    with pytest.raises(RuntimeError, match=message):
        parse({"schedule": value})


@pytest.mark.parametrize(
    "text, mask",
    [("auto", 0), ("ALL", 0xFFFF), (" 0 ", 1), ("1", 2), ("2", 4), ("0,1", 3), ("0,1,2", 7)],
)
def test_tp_mode_table(text, mask):
    assert parse({"tp_mode": text}).tp_mask == mask


def test_tp_mode_errors():
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match=r"invalid tp_mode: '0, 1', expected one of: auto, all, 0, 1, 2, 0,1, 0,1,2",
    ):
        parse({"tp_mode": "0, 1"})
    with pytest.raises(ezrt.InvalidTypeError, match="tp_mode must be a string"):
        parse({"tp_mode": 1})


def test_tp_mode_conflicts_with_schedule():
    with pytest.raises(
        ezrt.InvalidArgumentError, match=r"'tp_mode' conflicts with 'schedule'; set only one\."
    ):
        parse({"schedule": [0], "tp_mode": "auto"})


@pytest.mark.parametrize(
    "text, layout",
    [
        ("nchw", "nchw"),
        ("ORIGINAL", "nchw"),
        ("nchw_software", "nchw_software"),
        ("original_software", "nchw_software"),
        ("NHWC", "nhwc"),
        ("any", "any"),
    ],
)
def test_layouts_are_case_insensitive_with_aliases(text, layout):
    assert parse({"layout": text}).layout == layout


def test_layout_and_zero_copy_layout_errors():
    with pytest.raises(ezrt.InvalidArgumentError, match="Unknown layout: NCWH"):
        parse({"layout": "NCWH"})
    with pytest.raises(ezrt.InvalidTypeError, match="layout must be a string"):
        parse({"layout": None})
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match="Unknown zero_copy_layout: planar, expected 'nhwc' or 'native'",
    ):
        parse({"zero_copy_layout": "planar"})
    assert parse({"zero_copy_layout": "NATIVE"}).zero_copy_layout == "native"


def test_custom_op_paths_aliases_append_in_order(tmp_path):
    a, b, c = (tmp_path / name for name in ("a.so", "b.so", "c.so"))
    config = parse({"custom_op_path": str(a), "custom_op_paths": [b, pathlib.Path(c)]})
    assert config.custom_op_paths == (str(a), str(b), str(c))
    assert config.wants_custom_ops


def test_custom_op_path_errors():
    with pytest.raises(
        ezrt.InvalidTypeError, match="custom_op_paths must be a path-like object or sequence"
    ):
        parse({"custom_op_paths": 3})
    with pytest.raises(ezrt.InvalidTypeError, match="an element int"):
        parse({"custom_op_paths": ["ok.so", 3]})


def test_default_path_aliases_last_wins():
    assert (
        parse(
            {"custom_op_default_path": True, "load_custom_ops_from_default_path": "0"}
        ).custom_op_default_path
        is False
    )
    assert parse({"load_custom_ops_from_default_path": "yes"}).custom_op_default_path is True


def test_dispatch_policy():
    assert parse({"dispatch_policy": "Least_Loaded"}).dispatch_policy == "least_loaded"
    with pytest.raises(
        ezrt.InvalidArgumentError, match="dispatch_policy must be one of: round_robin, least_loaded"
    ):
        parse({"dispatch_policy": "random"})


def test_unknown_key_lists_supported_keys():
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match=r"Unknown provider_options key: max_queue_sise\. Supported keys: layout, ",
    ) as info:
        parse({"max_queue_sise": 4})
    for key in SUPPORTED_KEYS:
        assert key in str(info.value)


def test_non_string_key():
    with pytest.raises(ezrt.InvalidTypeError, match="keys must be strings"):
        parse({1: 2})


def test_foreign_keys_are_returned_only_when_allowed():
    config, foreign = parse_provider_options(
        {"device_id": 1, "max_queue_size": 2}, allow_foreign_keys=True
    )
    assert foreign == {"device_id": 1} and config.max_queue_size == 2
    assert config.given == frozenset({"max_queue_size"})


def test_provider_options_containers():
    assert split_provider_options(None) == []
    assert split_provider_options({"a": 1}) == [{"a": 1}]
    assert split_provider_options([{"a": 1}, {}]) == [{"a": 1}, {}]
    with pytest.raises(
        ezrt.InvalidTypeError,
        match="provider_options must be a dict or a sequence whose first element is a dict",
    ):
        split_provider_options("layout=nhwc")
    with pytest.raises(ezrt.InvalidTypeError, match="element 0 is int"):
        split_provider_options([3])


def test_make_provider_options_defaults_and_optional_keys():
    options = ezrt.make_provider_options()
    assert options == {
        "layout": "original",
        "max_queue_size": 3,
        "threads_per_core": 1,
        "submit_timeout_ms": 10000,
        "sequential_callbacks": True,
        "enable_pacing": False,
        "disable_dup_context": False,
        "custom_op_default_path": False,
    }
    options = ezrt.make_provider_options(
        schedule=[0, 1], zero_copy_layout="native", custom_op_paths=["x.so"]
    )
    assert options["schedule"] == [0, 1] and options["zero_copy_layout"] == "native"
    assert options["custom_op_paths"] == ["x.so"]
    assert parse(options).schedule == (0, 1)


def test_make_provider_options_conflict_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"provider options 'tp_mode' conflicts with 'schedule'; set only one\."
    ):
        ezrt.make_provider_options(schedule=[0], tp_mode="0")


def test_make_provider_options_is_keyword_only():
    with pytest.raises(TypeError):
        ezrt.make_provider_options("nhwc")  # type: ignore[misc]
