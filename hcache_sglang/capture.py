"""Hidden-state capture in the scheduler process (placeholder, being written)."""


def register() -> None:
    """Install scheduler-side hooks (placeholder)."""
