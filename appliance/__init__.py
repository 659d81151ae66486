"""Offline LLM appliance: a quantized chat model served over MQTT and HTTP on small ARM boards."""

__version__ = "0.1.0"
