"""Input and output: loading and saving models (external data, atomic writes, path safety), model inputs, ONNX Runtime sessions."""
