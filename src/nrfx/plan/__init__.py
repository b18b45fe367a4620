"""Stage 3, plan: budgets, the shared-rate solver and the immutable plan.

Also its old-to-new channel maps and the constants that removed channels leave.
"""

__all__: list[str] = []  # a stage folder; its modules hold the names, the public API is nrfx itself
