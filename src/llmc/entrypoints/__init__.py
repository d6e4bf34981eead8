"""Entrypoints: `oneshot` (calibrate + compress); each in its own module, read top to bottom."""
