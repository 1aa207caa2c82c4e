"""Closed-loop stage control: calibration, controller, stage drivers."""

__all__: list[str] = []
