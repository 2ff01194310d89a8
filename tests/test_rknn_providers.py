"""Provider selection, provider options and runtime lookup for RKNN models, as upstream 0.11.

UPSTREAM_0_11.md §1.2 (get_providers / get_provider_options), §1.4 (providers= forms), §1.5
(helpers), §2 (option keys per provider, RKNPU3 range checks, runtime libraries), §4.1
(magic and weight file), and the 0.11 tests "provider selection": helper contents,
provider/model mismatch, an unknown provider refused before the runtime loads.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import ezrt
from ezrt.backends import rknn
from ezrt.backends.rknn import abi
from ezrt.backends.rknn.options import parse_rknpu3_options
from ezrt.backends.rknn.providers import parse_request
from ezrt.backends.rknn.rknpu3 import abi as abi3

from .rknn_double.harness import (
    F32,
    NHWC,
    UNDEF,
    WEIGHTS,
    doubles,
    fake_model,
    fake_rknx,
    needs_cc,
    npu,
    npu3,
)

__all__ = ["doubles", "npu", "npu3"]  # fixtures used here

MODEL = fake_model(
    f"input image {F32} {NHWC} 4 1 4 5 3",
    f"output y {F32} 0 0 1.0 2.0 1.0 4 1 4 5 3",
    f"output flat {F32} 0 0 1.0 0.0 0.0 2 1 60",
)
RKNX = fake_rknx("input x 1 undefined 2 1 6", "output y 1 undefined 2.0 1.0 2 1 6")
x = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)


@pytest.fixture
def rknx_path(tmp_path: pathlib.Path) -> str:
    (tmp_path / "model.rknn").write_bytes(RKNX)
    (tmp_path / "model.weight").write_bytes(WEIGHTS)
    return str(tmp_path / "model.rknn")


# ---------------------------------------------------------------- the magic decides


def test_model_family_by_magic_including_encrypted_models():
    assert rknn.model_family(b"RKNN\0\0\0\0") == "RKNPU2"
    assert rknn.model_family(b"CYPTRKNN\0\0") == "RKNPU2"  # upstream 0.11 refuses these (N9)
    assert rknn.model_family(b"RKNXabcd") == "RKNPU3"
    assert rknn.model_family(b"\x08\x07onnx") is None
    assert set(rknn.RKNN_PROVIDER_NAMES) == {
        "RKNPU2ExecutionProvider",
        "RKNNExecutionProvider",
        "RKNPU3ExecutionProvider",
    }


@needs_cc
def test_encrypted_models_reach_the_runtime(npu):
    # not refused by a magic check: the runtime decides (the double cannot decrypt it)
    with pytest.raises(abi.RknnError, match=r"rknn_init failed: RKNN_ERR_MODEL_INVALID"):
        ezrt.InferenceSession(b"CYPTRKNN" + bytes(64))


@needs_cc
@pytest.mark.parametrize(
    "providers",
    [
        None,
        [],
        (),
        "RKNPU2ExecutionProvider",
        "RKNNExecutionProvider",
        ["RKNNExecutionProvider"],
        [("RKNPU2ExecutionProvider", {})],
        [["RKNNExecutionProvider", {"max_queue_size": 4}]],
    ],
)
def test_providers_forms_of_0_11(npu, providers):
    with ezrt.InferenceSession(MODEL, providers=providers) as s:
        assert s.get_providers() == ["RKNPU2ExecutionProvider"]  # canonical, even for the alias
        (y, _) = s.run(None, {"image": x})
    np.testing.assert_allclose(y, 2 * x.transpose(0, 2, 3, 1) + 1)


@needs_cc
def test_rknpu3_chosen_by_magic_and_by_name(npu3, rknx_path):
    for providers in (None, "RKNPU3ExecutionProvider", [("RKNPU3ExecutionProvider", {})]):
        with ezrt.InferenceSession(rknx_path, providers=providers) as s:
            assert s.get_providers() == ["RKNPU3ExecutionProvider"]


@pytest.mark.parametrize(
    "providers, error, message",
    [
        (
            ["RKNNExecutionProvider", "CPUExecutionProvider"],
            ezrt.InvalidArgumentError,
            "exactly one RKNN execution provider is supported per session",
        ),
        (
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ezrt.InvalidArgumentError,
            "exactly one RKNN execution provider is supported per session",
        ),
        (
            [("RKNPU2ExecutionProvider",)],
            ezrt.InvalidTypeError,
            r"provider tuple must be \(provider_name, options_dict\)",
        ),
        (
            [("RKNPU2ExecutionProvider", "not a dict")],
            ezrt.InvalidTypeError,
            r"provider tuple must be \(provider_name, options_dict\)",
        ),
        ([3], ezrt.InvalidTypeError, r"provider entry must be a name or \(name, options\) tuple"),
        (3, ezrt.InvalidTypeError, "providers must be a string or sequence"),
        ("CPUExecutionProvider", ezrt.InvalidArgumentError, "Unsupported execution provider"),
        (["TensorrtExecutionProvider"], ezrt.InvalidArgumentError, "Unsupported execution"),
    ],
)
def test_bad_providers_on_an_rknn_model_fail_before_the_runtime_loads(
    providers, error, message, monkeypatch
):
    monkeypatch.setenv(abi.RUNTIME_ENV, "/nonexistent/librknnrt.so")
    with pytest.raises(error, match=message) as caught:
        ezrt.InferenceSession(MODEL, providers=providers)
    assert isinstance(caught.value, RuntimeError)  # upstream raises RuntimeError everywhere


def test_provider_and_option_errors_come_before_the_file_is_read(tmp_path):
    missing = str(tmp_path / "missing.rknn")
    with pytest.raises(ezrt.InvalidArgumentError, match="exactly one RKNN execution provider"):
        ezrt.InferenceSession(missing, providers=["RKNPU2ExecutionProvider", "Nope"])
    with pytest.raises(ezrt.InvalidArgumentError, match="Unknown provider_options key: bogus"):
        ezrt.InferenceSession(
            missing, providers="RKNPU2ExecutionProvider", provider_options={"bogus": 1}
        )
    with pytest.raises(ezrt.InvalidArgumentError, match="Unable to open RKNN model: "):
        ezrt.InferenceSession(missing, providers="RKNPU2ExecutionProvider")


@pytest.mark.parametrize(
    "providers, model, message",
    [
        (
            "RKNPU2ExecutionProvider",
            b"RKNXdummy",
            "Provider/model mismatch: requested RKNPU2 but the model header is RKNPU3",
        ),
        (
            "RKNPU3ExecutionProvider",
            b"RKNNdummy",
            "Provider/model mismatch: requested RKNPU3 but the model header is RKNPU2",
        ),
        (
            "RKNPU2ExecutionProvider",
            b"\x08\x07\x12\x04onnx",
            "Unknown RKNN model magic: 08 07 12 04",
        ),
        ("RKNPU2ExecutionProvider", b"RK", "RKNN model is too small to contain a valid header"),
    ],
)
def test_a_request_that_contradicts_the_file(providers, model, message):
    with pytest.raises(ezrt.InvalidArgumentError, match=message):
        ezrt.InferenceSession(model, providers=providers)


# ---------------------------------------------------------------- options


def test_options_inline_or_separate_but_not_both():
    inline = [("RKNPU2ExecutionProvider", {"max_queue_size": 5})]
    assert parse_request(inline, None).rknpu2.max_queue_size == 5
    assert parse_request(inline, {}).rknpu2.max_queue_size == 5  # empty: the other is used
    assert (
        parse_request(
            [("RKNPU2ExecutionProvider", {})], {"max_queue_size": 6}
        ).rknpu2.max_queue_size
        == 6
    )
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match="provider options were supplied both inline and via provider_options",
    ):
        parse_request(inline, {"threads_per_core": 2})


@pytest.mark.parametrize(
    "provider_options, queue",
    [(None, 3), ("", 3), ({}, 3), ([], 3), ([{"max_queue_size": 7}, {"x": 1}], 7)],
)
def test_provider_options_containers(provider_options, queue):
    assert parse_request(None, provider_options).rknpu2.max_queue_size == queue


def test_provider_options_must_be_a_dict_or_start_with_one():
    with pytest.raises(
        ezrt.InvalidTypeError,
        match="provider_options must be a dict or a sequence whose first item is a dict",
    ):
        parse_request(None, ["layout=nhwc"])
    with pytest.raises(ezrt.InvalidTypeError, match="provider_options keys must be strings"):
        parse_request(None, {1: 2})


@pytest.mark.parametrize(
    "providers, options, message",
    [
        (
            "RKNPU2ExecutionProvider",
            {"runtime_library": "x"},
            "Unknown provider_options key: runtime_library",
        ),
        (
            "RKNPU2ExecutionProvider",
            {"weight_path": "x"},
            "Unknown provider_options key: weight_path",
        ),
        (
            "RKNPU3ExecutionProvider",
            {"layout": "nhwc"},
            "Unknown RKNPU3 provider_options key: layout",
        ),
        (
            "RKNPU3ExecutionProvider",
            {"tp_mode": "0"},
            "Unknown RKNPU3 provider_options key: tp_mode",
        ),
        (None, {"foo": 1}, "Unknown provider_options key: foo"),
        (None, {"priority": "high"}, "priority must be an integer"),  # auto: both sets checked
        (None, {"layout": "sideways"}, "Unknown layout: sideways"),
    ],
)
def test_which_keys_each_provider_accepts(providers, options, message):
    with pytest.raises(ezrt.EzrtError, match=message):
        parse_request(providers, options)


def test_auto_mode_validates_both_sets_and_uses_the_matching_one():
    request = parse_request(None, {"layout": "nhwc", "priority": 3, "threads_per_core": 2})
    assert request.family is None
    assert request.rknpu2.layout == "nhwc" and request.rknpu2.threads_per_core == 2
    assert request.rknpu3.priority == 3 and request.rknpu3_engine.threads_per_core == 2


@needs_cc
def test_the_other_familys_keys_are_ignored_in_auto_mode(npu, npu3, rknx_path):
    options = {"runtime_library": "/nowhere/librknn3_api.so", "priority": 1}
    with ezrt.InferenceSession(MODEL, provider_options=options) as s:
        assert s.get_providers() == ["RKNPU2ExecutionProvider"]
    with ezrt.InferenceSession(rknx_path, provider_options={"layout": "nhwc", "tp_mode": "0"}) as s:
        assert s.get_providers() == ["RKNPU3ExecutionProvider"]


@needs_cc
def test_get_provider_options_reports_what_was_given(npu):
    given = {"max_queue_size": "4", "priority": 2}  # unnormalised, other family's key kept
    with ezrt.InferenceSession(MODEL, provider_options=given) as s:
        reported = s.get_provider_options()
        assert reported == {"RKNPU2ExecutionProvider": given}
        assert reported["RKNPU2ExecutionProvider"] is not given  # a copy (upstream N10)
        given["max_queue_size"] = 9
        assert s.get_provider_options()["RKNPU2ExecutionProvider"]["max_queue_size"] == "4"
    with ezrt.InferenceSession(MODEL) as s:
        assert s.get_provider_options() == {"RKNPU2ExecutionProvider": {}}


def test_helpers_keep_the_backends_separate():
    assert ezrt.make_rknpu2_provider_options is ezrt.make_provider_options
    assert ezrt.Rknpu2ProviderOptions is ezrt.RknnProviderOptions
    assert ezrt.make_rknpu3_provider_options() == {
        "priority": 0,
        "run_timeout_ms": 0,
        "run_core_mask": "auto",
    }
    path = pathlib.Path("/opt/rknn3/librknn3_api.so")
    made = ezrt.make_rknpu3_provider_options(
        runtime_library=path, device_id=1, weight_path="m.weight", priority=-1, run_core_mask=3
    )
    assert made == {
        "priority": -1,
        "run_timeout_ms": 0,
        "run_core_mask": 3,
        "runtime_library": path,  # passed through unconverted
        "device_id": 1,
        "weight_path": "m.weight",
    }
    assert "zero_copy_layout" in ezrt.make_provider_options(zero_copy_layout="native")
    assert parse_rknpu3_options(made).runtime_library == str(path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"priority": 2**31}, "priority is out of int32 range"),
        ({"priority": -(2**31) - 1}, "priority is out of int32 range"),
        ({"run_timeout_ms": -1}, "run_timeout_ms is out of uint32 range"),
        ({"run_timeout_ms": 2**32}, "run_timeout_ms is out of uint32 range"),
        ({"run_core_mask": 2**32}, "run_core_mask is out of uint32 range"),
        ({"run_core_mask": -1}, "run_core_mask is out of uint32 range"),
        ({"run_core_mask": "AUTO"}, "run_core_mask must be an integer"),  # words are exact
        ({"device_id": 1.5}, "device_id must be an integer"),
        ({"runtime_library": 5}, "runtime_library must be a path-like object or string"),
        ({"weight_path": None}, "weight_path must be a path-like object or string"),
    ],
)
def test_rknpu3_range_checks(options, message):
    with pytest.raises(ezrt.EzrtError, match=message):
        parse_rknpu3_options(options)


def test_rknpu3_values_accepted():
    config = parse_rknpu3_options(
        {
            "priority": "-5",
            "run_timeout_ms": 2**32 - 1,
            "run_core_mask": " all ",
            "device_id": 2,
            "runtime_library": pathlib.Path("lib.so"),
        }
    )
    assert (config.priority, config.run_timeout_ms, config.run_core_mask) == (
        -5,
        2**32 - 1,
        2**32 - 1,
    )
    assert config.device_id == "2" and config.runtime_library == "lib.so"
    assert parse_rknpu3_options({"run_core_mask": "auto", "device_id": "npu0"}).device_id == "npu0"


# ---------------------------------------------------------------- runtime libraries


def test_rknpu2_library_candidates(monkeypatch):
    monkeypatch.delenv(abi.RUNTIME_ENV, raising=False)
    monkeypatch.delenv(abi.LIBRARY_ENV, raising=False)
    candidates = abi.candidate_paths()
    assert candidates[:2] == ["librknnrt.so", "librknnrt.so.2"]  # upstream's, first
    assert "/usr/lib/librknnrt.so" in candidates
    monkeypatch.setenv(abi.LIBRARY_ENV, "/old/name.so")
    assert abi.candidate_paths() == ["/old/name.so"]
    monkeypatch.setenv(abi.RUNTIME_ENV, "/x/librknnrt.so")  # 0.11's variable wins
    assert abi.candidate_paths() == ["/x/librknnrt.so"]


def test_missing_rknpu2_runtime_names_every_candidate(monkeypatch):
    monkeypatch.delenv(abi.RUNTIME_ENV, raising=False)
    monkeypatch.delenv(abi.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(abi, "USUAL_PATHS", ("/nonexistent/librknnrt.so",))
    with pytest.raises(ezrt.BackendUnavailableError) as caught:
        abi.load_runtime()
    text = str(caught.value)
    for expected in (
        "librknnrt.so: ",
        "librknnrt.so.2: ",
        "/nonexistent/librknnrt.so: no such file",
    ):
        assert expected in text
    assert "ZTU_RKNPU2_RUNTIME_LIBRARY" in text


def test_rknpu3_library_candidates(monkeypatch):
    monkeypatch.delenv(abi3.RUNTIME_ENV, raising=False)
    assert abi3.candidates() == [
        "librknn3_api.so",
        "librknn3_api_rkcp.so",
        "librknn3_api_native.so",
    ]
    monkeypatch.setenv(abi3.RUNTIME_ENV, "/env/librknn3_api.so")
    assert abi3.candidates() == ["/env/librknn3_api.so"]
    assert abi3.candidates("/option/lib.so") == ["/option/lib.so"]  # the option wins


def test_missing_rknpu3_runtime(monkeypatch, rknx_path):
    monkeypatch.delenv(abi3.RUNTIME_ENV, raising=False)
    with pytest.raises(
        ezrt.BackendUnavailableError,
        match=r"unable to load the RKNPU3 runtime\. Set provider option 'runtime_library' or "
        r"ZTU_RKNPU3_RUNTIME_LIBRARY\. Tried: librknn3_api\.so: .*librknn3_api_native\.so: ",
    ):
        ezrt.InferenceSession(rknx_path)


@needs_cc
def test_an_rknpu3_runtime_missing_a_symbol(doubles, rknx_path):
    with pytest.raises(
        ezrt.BackendUnavailableError, match=r"RKNPU3 runtime '.*' is missing symbol rknn3_init"
    ):
        ezrt.InferenceSession(rknx_path, provider_options={"runtime_library": doubles["current"]})


def test_runtime_is_loaded_before_the_weight_file_is_checked(monkeypatch, tmp_path):
    (tmp_path / "lonely.rknn").write_bytes(RKNX)  # no weight file
    monkeypatch.setenv(abi3.RUNTIME_ENV, str(tmp_path / "none.so"))
    with pytest.raises(ezrt.BackendUnavailableError, match="unable to load the RKNPU3 runtime"):
        ezrt.InferenceSession(str(tmp_path / "lonely.rknn"))


def test_layout_check_replaces_the_import_time_assert():
    abi.check_layouts()  # this platform (LP64 here) is fine
    import ctypes

    with pytest.raises(
        ezrt.BackendUnavailableError,
        match=r"does not match the arm32 ABI .*Input is 32 bytes, the header says 24",
    ):
        abi.check_layouts("arm32")  # LP64 layouts against 32-bit ARM expectations
    abi.check_layouts("arm32", abi.declare(ctypes.c_uint32, ctypes.c_uint32))
    with pytest.raises(ezrt.BackendUnavailableError, match="is not one ezrt knows"):
        abi.check_layouts("mips64")
    source = pathlib.Path(abi.__file__).read_text()
    assert "\nassert " not in source and "    assert " not in source


# ---------------------------------------------------------------- weight sharing across families


@needs_cc
def test_use_weight_from_is_rknpu2_only(npu, npu3, rknx_path):
    with ezrt.InferenceSession(rknx_path) as rknpu3, ezrt.InferenceSession(MODEL) as rknpu2:
        with pytest.raises(
            ezrt.InvalidArgumentError, match="use_weight_from is supported by RKNPU2 only"
        ):
            ezrt.InferenceSession(rknx_path, use_weight_from=rknpu2)
        with pytest.raises(
            ezrt.InvalidArgumentError, match="use_weight_from must refer to an RKNPU2 session"
        ):
            ezrt.InferenceSession(MODEL, use_weight_from=rknpu3)


# ---------------------------------------------------------------- NodeArg.layout / strides


@needs_cc
@pytest.mark.parametrize(
    "layout, shape, shown",
    [
        ("nchw", [1, 3, 4, 5], "NCHW"),  # upstream says NHWC beside an NCHW shape (N7)
        ("nchw_software", [1, 3, 4, 5], "NCHW"),
        ("nhwc", [1, 4, 5, 3], "NHWC"),
        ("any", [1, 4, 5, 3], "NHWC"),
    ],
)
def test_node_arg_layout_matches_the_reported_shape(npu, layout, shape, shown):
    with ezrt.InferenceSession(MODEL, provider_options={"layout": layout}) as s:
        (image,) = s.get_inputs()
        assert (image.shape, image.layout, image.strides) == (shape, shown, [])
        y, flat = s.get_outputs()
        assert (y.layout, flat.layout, flat.strides) == ("NCHW", "UNDEFINED", [])


@needs_cc
def test_undefined_inputs_and_run_with_iobinding_run_options(npu):
    model = fake_model(f"input v {F32} {UNDEF} 2 1 6", f"output w {F32} 0 0 1.0 1.0 1.0 2 1 6")
    with ezrt.InferenceSession(model) as s:
        assert s.get_inputs()[0].layout == "UNDEFINED"
        binding = s.io_binding()
        binding.bind_cpu_input("v", np.ones((1, 6), np.float32))
        with pytest.raises(ezrt.EzrtError, match="ztu_modelrt_dispatch_batch"):
            s.run_with_iobinding(binding, {"ztu_modelrt_dispatch_batch": "maybe"})
        s.run_with_iobinding(binding, {"ztu_modelrt_dispatch_batch": True})  # parsed, ignored
        assert binding.copy_outputs_to_cpu()[0].tolist() == [[2.0] * 6]
