"""Engines: one object per backend (ONNX Runtime, TensorRT) behind one model interface."""

from .loader import ENGINE_SUFFIXES, MODEL_SUFFIXES, ONNX_SUFFIXES, check_onnx_graph, load_model, onnx_contract
from .model import InputContract, SegmentationModel
from .onnxrt import OrtOptions
from .tensorrt import tensorrt_available

__all__ = ["ENGINE_SUFFIXES", "MODEL_SUFFIXES", "ONNX_SUFFIXES", "InputContract", "OrtOptions", "SegmentationModel",
           "check_onnx_graph", "load_model", "onnx_contract", "tensorrt_available"]
