"""Stage 5, train: the Algorithm 1 driver and its history."""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
