"""Transports: wire formats in and out (MQTT, HTTP). They know nothing about engines."""
