"""Backend names shared by every op."""
BACKENDS = ("ref", "auto")


def check_backend(backend: str) -> str:
    """Resolve ``backend`` to the implementation that will run (only ``ref`` exists so far)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return "ref"
