"""Inputs and outputs: tensor specs (``specs``), input feeds (``feed``), outputs
(``outputs``), and joining feeds for dynamic batching (``batch``)."""

from .batch import FeedBatcher, check_batchable
from .feed import FeedParser, InputPlan, OrtFeed
from .outputs import ALL_OUTPUTS, OutputNames, OutputSelection, concat_batch
from .specs import ONNX_TO_NUMPY, ModelMetadata, NodeArg, TensorSpec, dtype_name, format_shape

__all__ = [
    "ALL_OUTPUTS",
    "ONNX_TO_NUMPY",
    "FeedBatcher",
    "FeedParser",
    "InputPlan",
    "ModelMetadata",
    "NodeArg",
    "OrtFeed",
    "OutputNames",
    "OutputSelection",
    "TensorSpec",
    "check_batchable",
    "concat_batch",
    "dtype_name",
    "format_shape",
]
