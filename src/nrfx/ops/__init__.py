"""Leaves every stage reads: the op table type, the one vocabulary of op traits, one record per layer kind."""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
