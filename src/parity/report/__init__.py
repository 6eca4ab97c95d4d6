"""Rendering reports: JSON (stable schema) and terminal (rich)."""
