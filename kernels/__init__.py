"""Restore kernels: hidden states -> paged KV (the layout FlashInfer reads)."""
