"""Detectors (to be written)."""
