"""The supervisor: the watch loop (loop.py) reads the board (sensors.py), turns readings into levels (policies.py)
and tells the scheduler what it may do (guard.py, with memory admission in admission.py); it drives the GPIO
indicators (indicators.py) and talks to systemd (systemd.py)."""
