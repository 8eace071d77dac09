"""hcache-sglang: restore evicted SGLang prefix-cache state from saved hidden states."""
__version__ = "0.1.0"
