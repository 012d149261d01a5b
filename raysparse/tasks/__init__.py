"""Offline lm-eval tasks shipped with raysparse (task YAMLs and the builder of their data)."""
