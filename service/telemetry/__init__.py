"""Tracing (OpenTelemetry) and metrics (Prometheus); both optional and off the hot path
when not configured."""
