"""One copy of the weights: the model splitter, and the sessions that borrow its buffer.

With ``schedule`` on CPU, the workers' one-thread session and the wide session of lone
calls borrow one buffer of weights (``share_weights``); they must answer exactly as the
model loaded the ordinary way."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ezrt
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.backends.weights import LOCATION, MIN_BYTES, split_weights
from ezrt.bench import demo_model_path

from .conftest import WAIT


def _chain(sizes, seed=0) -> bytes:
    """x [1, 4] -> x + w0 + w1 + ... where w_i has ``sizes[i]`` floats (reduced to [1, 4])."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, size in enumerate(sizes):
        weight = rng.standard_normal(size).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes += [
            helper.make_node("ReduceSum", [f"w{i}"], [f"s{i}"], keepdims=1),
            helper.make_node("Add", [current, f"s{i}"], [f"y{i}"]),
        ]
        current = f"y{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _borrowing(split) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
    options.add_external_initializers_from_files_in_memory(
        [LOCATION], [split.weights], [split.weights.nbytes]
    )
    return ort.InferenceSession(split.model, options, providers=["CPUExecutionProvider"])


def _plain(model) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 3 * MIN_BYTES), min_size=1, max_size=6))
def test_a_split_model_answers_exactly_as_the_model(sizes):
    model = _chain(sizes)
    split = split_weights(model)
    large = sum(4 * size >= MIN_BYTES for size in sizes)
    if not large:
        assert split is None  # nothing worth moving: the model is loaded as it is
        return
    assert split is not None and split.moved == large
    assert len(split.model) < len(model)
    x = {"x": np.arange(4, dtype=np.float32)[None]}
    np.testing.assert_array_equal(_borrowing(split).run(None, x)[0], _plain(model).run(None, x)[0])
    # still a well-formed model: each large tensor refers into the buffer, the rest inline
    for tensor in onnx.load_from_string(split.model).graph.initializer:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if tensor.data_location == TensorProto.EXTERNAL:
            assert entries["location"] == LOCATION and int(entries["offset"]) % 4096 == 0
            assert int(entries["length"]) >= MIN_BYTES and not tensor.raw_data
        else:
            assert not entries and len(tensor.raw_data) < MIN_BYTES


def test_a_path_splits_as_its_bytes(tmp_path):
    path = tmp_path / "demo.onnx"
    with open(demo_model_path(), "rb") as handle:
        path.write_bytes(handle.read())
    from_path, from_bytes = split_weights(str(path)), split_weights(path.read_bytes())
    assert from_path is not None and from_bytes is not None
    assert from_path.model == from_bytes.model
    np.testing.assert_array_equal(from_path.weights, from_bytes.weights)


def test_what_cannot_be_split_is_left_alone(tmp_path):
    assert split_weights(b"not a model at all \xff\xff\xff") is None
    assert split_weights(str(tmp_path / "missing.onnx")) is None
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert split_weights(str(tmp_path / "empty.onnx")) is None
    # a model whose data already sits in a file beside it keeps reading it from there
    proto = onnx.load_from_string(_chain([4096]))
    onnx.save_model(
        proto,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.bin",
        size_threshold=0,
    )
    assert split_weights(str(tmp_path / "ext.onnx")) is None


def _cores():
    cores = allowed_cpus()[:2]
    if len(cores) < 2:
        pytest.skip("needs two CPUs")
    return cores


def test_scheduled_sessions_borrow_one_copy_and_answer_as_onnxruntime():
    cores = _cores()
    image = np.random.default_rng(3).random((1, 3, 128, 128), dtype=np.float32)
    expected = _plain(demo_model_path()).run(None, {"image": image})[0]
    with ezrt.InferenceSession(demo_model_path(), provider_options={"schedule": cores}) as session:
        backend = session._backend
        assert backend.shared_weights is not None and backend.wide is not None
        assert backend.master.get_session_options().intra_op_num_threads == 1
        assert backend.wide.get_session_options().intra_op_num_threads == len(cores)
        lone = session.run(None, {"image": image})[0]  # inline, on the wide session
        futures = [session.submit(None, {"image": image}) for _ in range(8)]  # the workers
        together = [future.result(WAIT)[0] for future in futures]
    np.testing.assert_allclose(lone, expected, rtol=1e-5, atol=1e-6)
    for output in together:
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, shared, wide",
    [
        ({"lone_run": "one_core"}, True, False),
        ({"share_weights": False}, False, True),
        ({"share_weights": False, "lone_run": "one_core"}, False, False),
    ],
)
def test_the_trade_is_an_option(options, shared, wide):
    cores = _cores()
    image = np.zeros((1, 3, 128, 128), np.float32)
    provider_options = {"schedule": cores, **options}
    with ezrt.InferenceSession(demo_model_path(), provider_options=provider_options) as session:
        backend = session._backend
        assert (backend.shared_weights is not None) == shared
        assert (backend.wide is not None) == wide
        assert session.run(None, {"image": image})[0].shape == (1, 10)


def test_a_callers_session_options_are_never_given_the_shared_buffer():
    cores = _cores()
    image = {"image": np.zeros((1, 3, 128, 128), np.float32)}
    options = ort.SessionOptions()
    with ezrt.InferenceSession(
        demo_model_path(), options, provider_options={"schedule": cores}
    ) as session:
        assert session._backend.shared_weights is None  # it would outlive this session
        assert session._backend.wide is None  # auto: a second copy of everything: no
        assert session.run(None, image)
    with ezrt.InferenceSession(
        demo_model_path(), options, provider_options={"schedule": cores, "lone_run": "all_cores"}
    ) as session:
        assert session._backend.shared_weights is None and session._backend.wide is not None
        assert session.run(None, image)
