"""Stage 4, rewrite: the passes that build the rejuvenated model from a plan.

A new model, or the rewrite moved into the user's own; gates added and folded.
"""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
