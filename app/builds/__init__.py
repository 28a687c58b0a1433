"""Builds: TensorRT engines and fp16 / int8 ONNX copies from a registered ONNX model, run as background jobs."""
