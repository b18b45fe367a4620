"""S/R layers: inference tiles and in-place gates give the block formulas of Sec. 3.3 exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nrfx.srlayers as srlayers
from nrfx.schemes import SRConv1d, SRConv2d, SRConv3d, SRLinear, _convert

CASES = [  # (base layer, SR class, input shape, functional op)
    (lambda: nn.Conv1d(7, 9, 3, padding=1), SRConv1d, (5, 7, 11), F.conv1d),
    (lambda: nn.Conv2d(7, 9, 3, padding=1, stride=2), SRConv2d, (5, 7, 9, 8), F.conv2d),
    (lambda: nn.Conv3d(7, 9, 1), SRConv3d, (5, 7, 3, 4, 5), F.conv3d),
    (lambda: nn.Linear(7, 9), SRLinear, (5, 4, 7), F.linear),
]


def _layer(make, cls, scheme: str, bias: bool):
    """A random S/R layer with S = 3 of 7 inputs and 5 of 9 outputs, float64."""
    torch.manual_seed(0)
    base = make().double()
    if not bias:
        base.bias = None
    return _convert(base, cls, scheme=scheme, s_in=3, s_out=5)


def _reference(layer, x: torch.Tensor, scheme: str, op) -> torch.Tensor:
    """The scheme's outputs from the four weight blocks, computed separately."""
    dim = 1 if op is not F.linear else x.dim() - 1
    kwargs = {k: getattr(layer, k) for k in ("stride", "padding", "dilation")} if op is not F.linear else {}
    w, b = layer.weight, layer.bias
    xs, xr = x.narrow(dim, 0, 3), x.narrow(dim, 3, 4)

    def block(inp, rows, cols, with_bias):
        bias = b[rows] if (with_bias and b is not None) else None
        return op(inp, w[rows, cols], bias, **kwargs)

    s, r, si, ri = slice(0, 5), slice(5, 9), slice(0, 3), slice(3, 7)
    ss, rr = block(xs, s, si, True), block(xr, r, ri, True)
    if scheme == "cr":
        return torch.cat([ss, rr], dim)
    rs, sr = block(xr, s, ri, False), block(xs, r, si, False)
    return torch.cat([ss + 2 * torch.sigmoid(ss) * rs, rr + 2 * torch.sigmoid(rr) * sr], dim)


@pytest.mark.parametrize("scheme", ["cr", "ca"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_tiled_inference_and_training_paths_match_block_formulas(case, bias, scheme, monkeypatch):
    make, cls, shape, op = CASES[case]
    layer = _layer(make, cls, scheme, bias)
    x = torch.randn(shape, dtype=torch.float64)
    expected = _reference(layer, x, scheme, op)
    trained = layer(x)  # autograd path (weights require grad)
    assert trained.requires_grad
    torch.testing.assert_close(trained, expected)
    with torch.no_grad():
        whole = layer(x)  # one tile: gates written in place
        monkeypatch.setattr(srlayers, "_TILE_BYTES", 1)  # every example its own tile, every gate row a chunk
        tiled = layer(x)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(tiled, expected)
    assert not tiled.requires_grad


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_unbatched_and_single_example_inputs(scheme, monkeypatch):
    monkeypatch.setattr(srlayers, "_TILE_BYTES", 1)
    layer = _layer(lambda: nn.Conv2d(7, 9, 3, padding=1), SRConv2d, scheme, True)
    x = torch.randn(1, 7, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0]), _reference(layer, x, scheme, F.conv2d)[0])
        torch.testing.assert_close(layer(x), _reference(layer, x, scheme, F.conv2d))


def test_inference_never_writes_into_the_input():
    layer = _layer(lambda: nn.Conv2d(7, 9, 1), SRConv2d, "ca", False)
    x = torch.randn(4, 7, 5, 5, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_gradients_match_block_formulas(scheme):
    make, cls, shape, op = CASES[1]
    layer = _layer(make, cls, scheme, True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    _reference(layer, x, scheme, op).square().sum().backward()
    for a, b in zip(got, (x.grad, layer.weight.grad, layer.bias.grad), strict=True):
        torch.testing.assert_close(a, b)
