"""Comparing two dumps: metrics, tolerance rules, pairing, outcomes, first divergence.

Nothing here imports torch or an engine: tensors are read with numpy from memory maps.
"""
