"""Text generation requests between the transports and the inference worker: the scheduler (scheduler.py) and its
jobs (jobs.py), the worker slot it drives (slot.py) and the optional moderation gate (moderation.py)."""
