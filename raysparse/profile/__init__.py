"""Searching the per-layer sparsity profile: a database of layers pruned once per level, and searches over it."""
