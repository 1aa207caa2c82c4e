"""Sinks: where measurements go (ZeroMQ publisher, record file)."""

__all__: list[str] = []
