"""Slow oracles written from the papers' equations (explicit loops, float64)."""
