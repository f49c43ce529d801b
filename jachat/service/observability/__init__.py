"""Metrics, their exposition, structured logs with request ids, and OpenTelemetry traces."""
