"""Tensor models (ONNX through onnxruntime) for sensors and small tasks: the parent's queue in front of their child
process (pool.py), JSON tensors in and out (arrays.py) and text turned into features (features.py). They run beside
the language model, never instead of it."""
