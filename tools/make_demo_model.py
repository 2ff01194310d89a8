"""Build ezrt's embedded demo model: a small image classifier, ~1 ms per inference on one core.

Run: python tools/make_demo_model.py  (needs onnx). Writes src/ezrt/data/demo_cnn.onnx.
The weights are random with a fixed seed: the model is for measuring, not for predicting.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = pathlib.Path(__file__).resolve().parents[1] / "src" / "ezrt" / "data" / "demo_cnn.onnx"


def build(seed: int = 20261124) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    channels = [3, 16, 32, 64]
    x = "image"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        b = np.zeros(cout, np.float32)
        inits += [
            numpy_helper.from_array(w, f"conv{i}.w"),
            numpy_helper.from_array(b, f"conv{i}.b"),
        ]
        stride = 1 if i == 0 else 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.w", f"conv{i}.b"],
                [f"conv{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    fc = (rng.standard_normal((64, 10)) / 8).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc, "fc.w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "ezrt_demo_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 128, 128])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ezrt"
    )
    model.ir_version = 8
    model.doc_string = (
        "ezrt demo: 3 conv layers + classifier on a 128x128 RGB image; random weights"
    )
    helper.set_model_props(model, {"purpose": "benchmark demo", "seed": str(seed)})
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
