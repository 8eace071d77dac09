"""Platform adaptations, applied only where the platform needs them."""


def apply() -> None:
    """Apply the adaptations this host needs (placeholder: filled in by platform/cpu.py)."""
