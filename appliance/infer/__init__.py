"""Tensor models (ONNX through onnxruntime) for sensors and small tasks: a child process of their own (child.py)
and the parent's queue in front of it (pool.py). They run beside the language model, never instead of it."""
