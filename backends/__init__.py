"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB."""
