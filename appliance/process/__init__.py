"""Child processes: the inference worker (llm_worker.py), the ONNX worker (onnx_worker.py) and the parent's handle
on either (handle.py)."""
