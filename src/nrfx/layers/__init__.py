"""The layers nrfx emits and every stage recognises: S/R layers (cr, ca) and per-channel gates; torch only."""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
