"""Stage 1, capture: a model as one FX graph with shapes.

fx tracing, or torch.export raised back to the user's modules, checked against the model.
"""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
