"""Aligning what different engines capture: canonical taps per architecture."""
