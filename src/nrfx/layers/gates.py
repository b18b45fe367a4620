"""Gates: a per-channel learnable scale where a free space has no norm to read liveliness from.

The paper allows "an affine transform layer with learnable parameters" where batch
normalization is not practical (Sec. 3.1.1).  A ``Gate`` multiplies its input by ``weight``
along one channel dim; it starts at 1 (the identity), and the analysis treats it as a norm
scale: it marks dead channels (``g = 0`` or ``|g| < 0.01·max|g|``), carries the driver's L1
penalty, and its rejuvenated entries start at γ0.  This module imports only torch, so the analysis rules,
the tracer and the rewrite may all depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Gate"]


class Gate(nn.Module):
    """y = x · weight along ``dim`` (1 for NCHW, -1 for channels-last and tokens); weight starts at 1."""

    def __init__(self, num_features: int, dim: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"Gate needs num_features >= 1 (the width of the channel dim), got {num_features!r}")
        self.num_features, self.dim = num_features, int(dim)
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Every gate open: weight = 1."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times ``weight``, broadcast on ``dim``."""
        dim = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}"
