"""The lazy TensorRT backend and the TensorRT pitfalls found by reading the graph."""
