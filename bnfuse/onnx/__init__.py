"""ONNX backend: graph index, fold rules, onnxruntime runner. Never imports tensorflow."""
