"""The inference worker: a child process (child.py), the parent's handle on it (handle.py) and its life cycle
as the scheduler drives it (lifecycle.py)."""
