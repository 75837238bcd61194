"""Errors raised by dit-accel. Each message names the input, the constraint and the fix."""


class UnsupportedModelError(ValueError):
    """A model (or attention module) of a family dit-accel has no adapter for."""


class MethodUnavailableError(RuntimeError):
    """An attention method or backend cannot run on this device, dtype or shape."""
