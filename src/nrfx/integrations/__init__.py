"""nrfx.integrations: Neural Rejuvenation as a callback of a training framework, in place.

``nrfx.integrations.lightning.NeuralRejuvenationCallback`` (Lightning 2.x) and
``nrfx.integrations.transformers.NeuralRejuvenationCallback`` (Hugging Face ``Trainer``) run
Algorithm 1 inside the framework's own loop on its own model, optimizer and scheduler (see
docs/integrations.md).  Each submodule imports its framework; this package imports neither.
"""

from __future__ import annotations

__all__: list[str] = []
