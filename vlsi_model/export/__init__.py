"""Deployment artefacts: ONNX export (`onnx_export`), TensorRT engines (`tensorrt_build`),
the TensorRT operator check (`trt_ops`) and memory estimates for Jetson boards (`memory`).

Submodules are imported on use: `onnx_export` needs torch + onnx, `tensorrt_build` only
TensorRT (where present), `memory` nothing but the standard library.
"""
