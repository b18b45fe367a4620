"""Stage 2, analyze: channel spaces, the op rules, costs, liveliness; islands when nothing captures the whole model."""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
