"""ezrt is onnxruntime plus scheduling: every name, argument form, feed, RunOptions and error
of ``onnxruntime.InferenceSession`` behaves as onnxruntime's own, on every call path.

Each test runs the same thing on onnxruntime and on ezrt and compares. (onnxruntime's own
Python test suite, run with the import changed, is ``tools/ort_suite.py``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any, Callable, Dict, List

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

import ezrt
from ezrt.compat import FORWARDED

from .conftest import FLOAT, WAIT, Collector, assert_same_error, ones, tensor


def _model(graph: Any, opset: int = 17) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def sequence_model() -> bytes:
    """seq: a sequence of float tensors -> n = its length."""
    return _model(
        helper.make_graph(
            [helper.make_node("SequenceLength", ["seq"], ["n"])],
            "seq",
            [helper.make_tensor_sequence_value_info("seq", FLOAT, None)],
            [tensor("n", TensorProto.INT64, [])],
        )
    )


@pytest.fixture(scope="module")
def optional_model() -> bytes:
    """o: an optional float tensor (may be left out) -> has = whether it was given."""
    element = helper.make_tensor_type_proto(FLOAT, [1, 4])
    optional = helper.make_value_info("o", helper.make_optional_type_proto(element))
    return _model(
        helper.make_graph(
            [helper.make_node("OptionalHasElement", ["o"], ["has"])],
            "optional",
            [optional],
            [tensor("has", TensorProto.BOOL, [])],
        ),
        opset=18,
    )


@pytest.fixture(scope="module")
def string_model() -> bytes:
    """s: strings -> t = s."""
    return _model(
        helper.make_graph(
            [helper.make_node("Identity", ["s"], ["t"])],
            "strings",
            [tensor("s", TensorProto.STRING, [None])],
            [tensor("t", TensorProto.STRING, [None])],
        )
    )


@pytest.fixture(scope="module")
def overridable_model() -> bytes:
    """y = x + w, where w is an input with a default (an overridable initializer)."""
    weight = numpy_helper.from_array(np.zeros((1, 4), np.float32), "w")
    return _model(
        helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])],
            "overridable",
            [tensor("x", FLOAT, [1, 4]), tensor("w", FLOAT, [1, 4])],
            [tensor("y", FLOAT, [1, 4])],
            [weight],
        )
    )


def _reference(model: bytes) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- every call path


def _via_run(session: Any, feed: Any, options: Any) -> List[Any]:
    return session.run(None, feed, options)  # type: ignore[no-any-return]


def _via_run_async(session: Any, feed: Any, options: Any) -> List[Any]:
    collector = Collector()
    session.run_async(None, feed, collector, None, options)
    ((results, _, err),) = collector.wait_for(1)
    if err:
        raise RuntimeError(err)
    return results  # type: ignore[no-any-return]


def _via_submit(session: Any, feed: Any, options: Any) -> List[Any]:
    return session.submit(None, feed, options).result(timeout=WAIT)  # type: ignore[no-any-return]


def _via_arun(session: Any, feed: Any, options: Any) -> List[Any]:
    return asyncio.run(session.arun(None, feed, options))  # type: ignore[no-any-return]


def _via_imap(session: Any, feed: Any, options: Any) -> List[Any]:
    assert options is None  # imap takes no run options
    (result,) = list(session.imap([feed]))
    return result  # type: ignore[no-any-return]


PATHS: Dict[str, Callable[[Any, Any, Any], List[Any]]] = {
    "run": _via_run,
    "run_async": _via_run_async,
    "submit": _via_submit,
    "arun": _via_arun,
    "imap": _via_imap,
}


def _same_outputs(mine: List[Any], theirs: List[Any]) -> None:
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


FEEDS = {
    "sequence of tensors": ("sequence_model", {"seq": [ones(), ones(), ones()]}),
    "empty sequence": ("sequence_model", {"seq": []}),
    "optional given": ("optional_model", {"o": ones()}),
    "optional left out": ("optional_model", {}),
    # (ORT reads a fixed-width bytes element up to the next NUL: b"ab" + b"c" -> "abc".)
    "bytes tensor": ("string_model", {"s": np.array([b"ab", b"c"])}),
    "str tensor": ("string_model", {"s": np.array(["ab", "c"])}),
    "object tensor": ("string_model", {"s": np.array(["ab", "c"], dtype=object)}),
    "void tensor": ("string_model", {"s": np.array([b"ab", b"cd"]).view(np.void)}),
    "list of str": ("string_model", {"s": ["ab", "c"]}),
    "initializer fed by name": ("overridable_model", {"x": ones(), "w": ones(value=5)}),
    "initializer left to its default": ("overridable_model", {"x": ones()}),
    "OrtValue": ("overridable_model", {"x": ort.OrtValue.ortvalue_from_numpy(ones())}),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", FEEDS)
def test_every_feed_onnxruntime_runs_gives_its_result_on_every_path(request, kind, path):
    fixture, feed = FEEDS[kind]
    model = request.getfixturevalue(fixture)
    expected = _reference(model).run(None, feed)
    with ezrt.InferenceSession(model, provider_options={"threads_per_core": 2}) as session:
        _same_outputs(PATHS[path](session, feed, None), expected)


@pytest.mark.parametrize("path", [p for p in PATHS if p != "imap"])
def test_run_options_reach_onnxruntime_on_every_path(tmp_path, overridable_model, path):
    # A LoRA adapter replaces w: the base model's answer would be silently wrong.
    adapter_format = ort.AdapterFormat()
    adapter_format.set_adapter_version(1)
    adapter_format.set_model_version(1)
    adapter_format.set_parameters({"w": ort.OrtValue.ortvalue_from_numpy(ones(value=5))})
    adapter_path = str(tmp_path / "w.onnx_adapter")
    adapter_format.export_adapter(adapter_path)
    adapter = ort.LoraAdapter()
    adapter.Load(adapter_path)
    with_adapter = ort.RunOptions()
    with_adapter.add_active_adapter(adapter)
    feed = {"x": ones()}
    reference = _reference(overridable_model)
    expected = reference.run(None, feed, with_adapter)
    assert expected[0][0, 0] == 6.0
    terminate = ort.RunOptions()
    terminate.terminate = True
    with ezrt.InferenceSession(overridable_model) as session:
        _same_outputs(PATHS[path](session, feed, with_adapter), expected)
        with pytest.raises(RuntimeError, match="Exiting due to terminate flag being set to true"):
            PATHS[path](session, feed, terminate)
        if path != "run_async":  # a callback gets the text only
            assert_same_error(
                lambda: PATHS[path](session, feed, terminate),
                lambda: reference.run(None, feed, terminate),
            )


def test_batch_dispatch_keeps_the_run_options(overridable_model, tmp_path):
    options = ort.RunOptions()
    options.add_run_config_entry("ztu_modelrt_dispatch_batch", "1")
    options.terminate = True
    with (
        ezrt.InferenceSession(overridable_model) as session,
        pytest.raises(ezrt.BatchInferenceError, match="terminate flag"),
    ):
        session.run(None, {"x": np.ones((3, 4), np.float32)}, options)


# ---------------------------------------------------------------- errors


def test_onnxruntimes_errors_are_its_classes_and_ezrts(reshape_model):
    reference = _reference(reshape_model)
    bad_run = {"x": np.ones((1, 6), np.float32), "shape": np.array([4, 4])}
    bad_dtype = {"x": np.ones((1, 6)), "shape": np.array([2, 3])}
    missing = {"x": np.ones((1, 6), np.float32)}
    with ezrt.InferenceSession(reshape_model) as session:
        for feed, ort_class, ezrt_class in (
            (bad_run, ort_errors.Fail, ezrt.InferenceError),
            (bad_dtype, ort_errors.InvalidArgument, ezrt.InvalidArgumentError),
            (missing, ValueError, ezrt.InvalidArgumentError),
        ):
            for path in ("run", "submit", "arun"):
                error = assert_same_error(
                    lambda p=path, f=feed: PATHS[p](session, f, None),
                    lambda f=feed: reference.run(None, f),
                )
                assert isinstance(error, ort_class) and isinstance(error, ezrt_class)
                assert isinstance(error, RuntimeError)
    error = assert_same_error(
        lambda: ezrt.InferenceSession(b"not a model"), lambda: ort.InferenceSession(b"not a model")
    )
    assert isinstance(error, ort_errors.InvalidProtobuf) and isinstance(error, ezrt.EzrtError)


def test_node_args_and_metadata_are_onnxruntimes_own(add_model):
    reference = _reference(add_model)
    with ezrt.InferenceSession(add_model) as session:
        for mine, theirs in zip(session.get_inputs(), reference.get_inputs()):
            assert type(mine) is type(theirs)
            assert isinstance(mine, ezrt.NodeArg) and isinstance(mine, ort.NodeArg)
        meta = session.get_modelmeta()
        assert isinstance(meta, ort.ModelMetadata) and isinstance(meta, ezrt.ModelMetadata)
        assert meta.custom_metadata_map == reference.get_modelmeta().custom_metadata_map


# ---------------------------------------------------------------- the session's names


def test_every_public_name_of_onnxruntimes_session_is_ezrts(add_model):
    """Fails when a new onnxruntime adds a public name ezrt has not reviewed: it is then
    forwarded unreviewed by ``__getattr__``; add it to ``ezrt.compat.FORWARDED`` or define
    it on the session."""
    theirs = {name for name in dir(ort.InferenceSession) if not name.startswith("_")}
    mine = {name for name in dir(ezrt.InferenceSession) if not name.startswith("_")}
    assert theirs - mine == set()
    assert set(FORWARDED) <= mine


def test_forwarded_methods_answer_as_onnxruntime(add_model, overridable_model):
    reference = _reference(overridable_model)
    with ezrt.InferenceSession(overridable_model) as session:
        assert [i.name for i in session.get_overridable_initializers()] == ["w"]
        assert len(session.get_input_memory_infos()) == len(reference.get_input_memory_infos())
        assert len(session.get_output_memory_infos()) == len(reference.get_output_memory_infos())
        assert session.get_session_options().intra_op_num_threads == (
            reference.get_session_options().intra_op_num_threads
        )
        assert session.get_tuning_results() == reference.get_tuning_results()
        assert_same_error(
            session.get_provider_graph_assignment_info,
            reference.get_provider_graph_assignment_info,
        )
        outputs = session.run_with_ort_values(
            ["y"], {"x": ort.OrtValue.ortvalue_from_numpy(ones())}
        )
        assert outputs[0].numpy().tolist() == [[1.0] * 4]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(os.path.join(os.getcwd(), "ezrt_test_profile"))
    with ezrt.InferenceSession(add_model, options) as session:
        assert session.get_profiling_start_time_ns() > 0
        session.run(None, [ones(), ones()])
        profile = session.end_profiling()
    assert os.path.isfile(profile)
    os.remove(profile)


def test_set_providers_rebuilds_the_workers(add_model, collector):
    reference = _reference(add_model)
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        session.run_async(None, [ones(), ones()], collector, 1)
        session.set_providers(["CPUExecutionProvider"])
        session.run_async(None, [ones(), ones()], collector, 2)
        assert [u for _, u, _ in collector.wait_for(2)] == [1, 2]
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert_same_error(
            lambda: session.set_providers(["NoSuchProvider"]),
            lambda: reference.set_providers(["NoSuchProvider"]),
        )


def test_onnxruntime_keyword_arguments_and_no_others(add_model):
    with ezrt.InferenceSession(add_model, disabled_optimizers=[], enable_fallback=0) as session:
        assert session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_weight_frm'"):
        ezrt.InferenceSession(add_model, use_weight_frm=None)


# ---------------------------------------------------------------- provider arguments


def test_onnxruntimes_provider_forms_are_onnxruntimes(add_model):
    forms = [
        dict(providers=["CPUExecutionProvider"]),
        dict(providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]),
        dict(
            providers=["CPUExecutionProvider"],
            provider_options=[{"arena_extend_strategy": "kSameAsRequested"}],
        ),
        dict(providers=ort.get_available_providers()),
    ]
    for form in forms:
        reference = ort.InferenceSession(add_model, **form)
        with ezrt.InferenceSession(add_model, **form) as session:
            assert session.get_providers() == reference.get_providers()
            assert session.get_provider_options() == reference.get_provider_options()


def test_ezrt_options_are_a_dict_or_upstreams_list_without_providers(add_model):
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        assert session._live_engine().worker_count == 2
    with ezrt.InferenceSession(add_model, provider_options=[{"threads_per_core": 3}]) as session:
        assert session._live_engine().worker_count == 3
    with ezrt.InferenceSession(
        add_model, providers=["CPUExecutionProvider"], provider_options={"threads_per_core": 2}
    ) as session:
        assert session._live_engine().worker_count == 2
    with pytest.raises(ezrt.InvalidArgumentError, match="'threads_per_core' is an ezrt option"):
        ezrt.InferenceSession(
            add_model,
            providers=["CPUExecutionProvider"],
            provider_options=[{"threads_per_core": 2}],
        )
    with pytest.raises(ezrt.InvalidArgumentError, match="Unknown provider_options key"):
        ezrt.InferenceSession(add_model, provider_options={"arena_extend_strategy": "x"})


def test_environment_variable_gives_defaults(add_model, monkeypatch):
    monkeypatch.setenv("EZRT_PROVIDER_OPTIONS", json.dumps({"threads_per_core": 2}))
    with ezrt.InferenceSession(add_model) as session:
        assert session._live_engine().worker_count == 2
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 3}) as session:
        assert session._live_engine().worker_count == 3  # the call's own options win
    for bad, phrase in (("{not json", "not valid JSON"), ('{"bogus": 1}', "bogus"), ("[1]", "")):
        monkeypatch.setenv("EZRT_PROVIDER_OPTIONS", bad)
        with pytest.raises(ezrt.InvalidArgumentError, match=f"EZRT_PROVIDER_OPTIONS.*{phrase}"):
            ezrt.InferenceSession(add_model)


def test_patch_onnxruntime_switches_a_library_on_and_off(add_model):
    original = ort.InferenceSession
    with ezrt.patch_onnxruntime(threads_per_core=2) as patch:
        session = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])
        assert isinstance(session, ezrt.InferenceSession)
        with session:
            assert session._live_engine().worker_count == 2
            assert session.run(["sum"], {"a": ones(), "b": ones()})[0][0, 0] == 2.0
        assert patch.active
    assert ort.InferenceSession is original and not patch.active
    patch.undo()  # idempotent
    assert ort.InferenceSession is original


def test_global_assignment_of_the_class_works(add_model, monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", ezrt.InferenceSession)
    with ort.InferenceSession(add_model) as session:
        assert session.run(["sum"], {"a": ones(), "b": ones()})[0][0, 0] == 2.0


LIBRARY = textwrap.dedent(
    """
    import sys, json, numpy as np, onnxruntime
    class Library:  # builds its own session, as an OCR or vision library does
        def __init__(self, model):
            options = onnxruntime.SessionOptions()
            self.session = onnxruntime.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"])
        def __call__(self, a, b):
            return self.session.run(None, {"a": a, "b": b})[0]
    model = open(sys.argv[1], "rb").read()
    if sys.argv[2] == "patched":
        import ezrt
        ezrt.patch_onnxruntime(threads_per_core=2)
    elif sys.argv[2] == "environment":  # the options come from EZRT_PROVIDER_OPTIONS
        import ezrt
        ezrt.patch_onnxruntime()
    library = Library(model)
    one = np.ones((1, 4), np.float32)
    kind = type(library.session).__module__
    engine = getattr(library.session, "_engine", None)
    workers = engine.worker_count if engine is not None else None
    print(json.dumps({"kind": kind, "workers": workers, "sum": library(one, one).tolist()}))
    """
)


def test_a_library_switched_on_by_the_patch_gives_identical_results(add_model, tmp_path):
    model = tmp_path / "add.onnx"
    model.write_bytes(add_model)
    script = tmp_path / "library.py"
    script.write_text(LIBRARY)
    answers = {}
    environment = {**os.environ, "EZRT_PROVIDER_OPTIONS": json.dumps({"threads_per_core": 3})}
    for mode in ("plain", "patched", "environment"):
        done = subprocess.run(
            [sys.executable, str(script), str(model), mode],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env=environment,
        )
        answers[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers["plain"]["kind"].startswith("onnxruntime")
    assert answers["patched"]["kind"] == answers["environment"]["kind"] == "ezrt.patch"
    assert answers["patched"]["workers"] == 2  # the patch's own options win over the variable
    assert answers["environment"]["workers"] == 3
    assert answers["plain"]["sum"] == answers["patched"]["sum"] == answers["environment"]["sum"]


# ---------------------------------------------------------------- the module


def test_onnxruntimes_names_are_reexported():
    from ezrt import (  # the line a library changes
        GraphOptimizationLevel,
        InferenceSession,
        RunOptions,
        SessionOptions,
        get_available_providers,
        get_device,
    )

    assert SessionOptions is ort.SessionOptions and RunOptions is ort.RunOptions
    assert GraphOptimizationLevel is ort.GraphOptimizationLevel
    assert get_available_providers is ort.get_available_providers
    assert get_device is ort.get_device and InferenceSession is ezrt.InferenceSession
    assert ezrt.ExecutionMode is ort.ExecutionMode
    # OrtValue serves both backends; on ONNX Runtime its values are onnxruntime's own
    value = ezrt.OrtValue.ortvalue_from_numpy(ones())
    assert type(value) is ort.OrtValue and isinstance(value, ezrt.OrtValue)
    assert isinstance(ort.OrtValue.ortvalue_from_numpy(ones()), ezrt.OrtValue)
    with pytest.raises(AttributeError):
        ezrt.no_such_name  # noqa: B018


def test_star_import_does_not_import_onnxruntime():
    code = "from ezrt import *; import sys; print('onnxruntime' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False"
