"""S/R layers: the stored blocks give the block formulas of Sec. 3.3 exactly, with the fewest aten calls."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from support import AtenCalls
from torch import nn

from nrfx.layers.srlayers import SRConv1d, SRConv2d, SRConv3d, SRLinear, blocks_of, join_blocks, make_sr, to_dense

CASES = [  # (base layer, SR class, input shape, functional op)
    (lambda: nn.Conv1d(7, 9, 3, padding=1), SRConv1d, (5, 7, 11), F.conv1d),
    (lambda: nn.Conv2d(7, 9, 3, padding=1, stride=2), SRConv2d, (5, 7, 9, 8), F.conv2d),
    (lambda: nn.Conv3d(7, 9, 1), SRConv3d, (5, 7, 3, 4, 5), F.conv3d),
    (lambda: nn.Linear(7, 9), SRLinear, (5, 4, 7), F.linear),
]
S_IN, S_OUT = 3, 5


def _dense(make, bias: bool) -> nn.Module:
    """A random plain layer in float64 (7 inputs, 9 outputs)."""
    torch.manual_seed(0)
    base = make().double()
    if not bias:
        base.bias = None
    return base


def _reference(dense: nn.Module, x: torch.Tensor, scheme: str, op) -> torch.Tensor:
    """The scheme's outputs from the four blocks of the dense weight, computed separately."""
    dim = 1 if op is not F.linear else x.dim() - 1
    kwargs = {k: getattr(dense, k) for k in ("stride", "padding", "dilation")} if op is not F.linear else {}
    w, b = dense.weight, dense.bias
    xs, xr = x.narrow(dim, 0, S_IN), x.narrow(dim, S_IN, x.shape[dim] - S_IN)

    def block(inp, rows, cols, with_bias):
        bias = b[rows] if (with_bias and b is not None) else None
        return op(inp, w[rows, cols], bias, **kwargs)

    s, r, si, ri = slice(0, S_OUT), slice(S_OUT, None), slice(0, S_IN), slice(S_IN, None)
    ss, rr = block(xs, s, si, True), block(xr, r, ri, True)
    if scheme == "cr":
        return torch.cat([ss, rr], dim)
    rs, sr = block(xr, s, ri, False), block(xs, r, si, False)
    return torch.cat([ss + 2 * torch.sigmoid(ss) * rs, rr + 2 * torch.sigmoid(rr) * sr], dim)


@pytest.mark.parametrize("scheme", ["cr", "ca"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_training_and_inference_match_block_formulas(case, bias, scheme):
    make, cls, shape, op = CASES[case]
    dense = _dense(make, bias)
    layer = make_sr(dense, scheme, S_IN, S_OUT)
    assert type(layer) is cls and layer.scheme == scheme
    x = torch.randn(shape, dtype=torch.float64)
    expected = _reference(dense, x, scheme, op)
    trained = layer(x)
    assert trained.requires_grad
    torch.testing.assert_close(trained, expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x[:1]), expected[:1])


@pytest.mark.parametrize("scheme", ["cr", "ca"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_stored_blocks_are_contiguous_and_only_what_the_scheme_computes(case, scheme):
    make, _, _, _ = CASES[case]
    dense = _dense(make, True)
    layer = make_sr(dense, scheme, S_IN, S_OUT)
    params = dict(layer.named_parameters())
    assert all(p.is_contiguous() for p in params.values())
    w = dense.weight.detach()
    if scheme == "cr":
        assert set(params) == {"weight_ss", "weight_rr", "bias_s", "bias_r"}
        assert torch.equal(params["weight_ss"], w[:S_OUT, :S_IN]) and torch.equal(params["weight_rr"], w[S_OUT:, S_IN:])
        assert sum(p.numel() for p in params.values()) < sum(p.numel() for p in dense.parameters())
        expected = w.clone()
        expected[:S_OUT, S_IN:] = 0
        expected[S_OUT:, :S_IN] = 0
    else:
        assert set(params) == {"weight_s_in", "weight_r_in", "bias_all"}
        assert torch.equal(params["weight_s_in"], w[:, :S_IN]) and torch.equal(params["weight_r_in"], w[:, S_IN:])
        expected = w
    assert torch.equal(layer.weight, expected) and torch.equal(layer.bias, dense.bias.detach())
    back = to_dense(layer)
    assert type(back) is type(dense) and torch.equal(back.weight, expected)
    assert (back.in_features if isinstance(back, nn.Linear) else back.in_channels) == 7


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_blocks_of_and_join_blocks_are_inverse(scheme):
    layer = make_sr(_dense(CASES[1][0], True), scheme, S_IN, S_OUT)
    for attr in ("weight", "bias"):
        dense = getattr(layer, attr)
        parts = blocks_of(layer, attr, dense)
        assert {k: tuple(v.shape) for k, v in parts.items()} == {
            k: tuple(p.shape) for k, p in layer.named_parameters() if k.startswith(attr)}
        torch.testing.assert_close(join_blocks(layer, attr, parts), dense)


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_unbatched_and_single_example_inputs(scheme):
    dense = _dense(lambda: nn.Conv2d(7, 9, 3, padding=1), True)
    layer = make_sr(dense, scheme, S_IN, S_OUT)
    x = torch.randn(1, 7, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0]), _reference(dense, x, scheme, F.conv2d)[0])
        torch.testing.assert_close(layer(x), _reference(dense, x, scheme, F.conv2d))


def test_inference_never_writes_into_the_input():
    layer = make_sr(_dense(lambda: nn.Conv2d(7, 9, 1), False), "ca", S_IN, S_OUT)
    x = torch.randn(4, 7, 5, 5, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_gradients_match_block_formulas(scheme):
    make, _, shape, op = CASES[1]
    dense = _dense(make, True)
    layer = make_sr(dense, scheme, S_IN, S_OUT)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    got_x = x.grad.clone()
    x.grad = None
    _reference(dense, x, scheme, op).square().sum().backward()
    torch.testing.assert_close(got_x, x.grad)
    for attr in ("weight", "bias"):
        want = blocks_of(layer, attr, getattr(dense, attr).grad)
        for name, grad in want.items():
            torch.testing.assert_close(layer.get_parameter(name).grad, grad)


# (scheme, bias, grad) -> aten calls of one forward: split, two convs, then cr: cat; ca with autograd: where,
# where, [add], sigmoid, addcmul; ca without: split a, split b, [split bias, add_, add_], sigmoid ×2, addcmul ×2
# (no grad, grad); ca without a bias writes its gate into the first output (9 calls), with one the mask form (8)
EXPECTED_CALLS = {("cr", False): (4, 4), ("cr", True): (4, 4), ("ca", False): (9, 7), ("ca", True): (8, 8)}


@pytest.mark.parametrize("scheme", ["cr", "ca"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_forward_launches_only_what_the_maths_needs(scheme, bias):
    layer = make_sr(_dense(lambda: nn.Conv2d(7, 9, 3, padding=1), bias), scheme, S_IN, S_OUT)
    x = torch.randn(4, 7, 6, 6, dtype=torch.float64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), AtenCalls() as mode:
            layer(x)
        launched = sum(n for op, n in mode.calls.items() if op != "detach")  # autograd's saved-output alias
        assert launched == EXPECTED_CALLS[scheme, bias][grad], mode.calls
        assert mode.calls["convolution"] == 2 and not (mode.calls["copy_"] or mode.calls["clone"])


# ca, forward + backward of ``layer(x).sum()``, the loss's own calls and autograd's aliases left out: the forward's
# 7 (8), then mul, sigmoid_backward, add (g_d), mul, mul (g_c), where ×2 (g_a, g_b), [sum, view (g_bias)], two
# convolution backwards and the split's cat; autograd's own backward of the mask form took 9 calls more
EXPECTED_TRAINING_CALLS = {False: 17, True: 20}


@pytest.mark.parametrize("bias", [True, False])
def test_ca_backward_launches_only_what_the_maths_needs(bias):
    layer = make_sr(_dense(lambda: nn.Conv2d(7, 9, 3, padding=1), bias), "ca", S_IN, S_OUT)
    x = torch.randn(4, 7, 6, 6, dtype=torch.float64, requires_grad=True)
    with AtenCalls() as mode:
        layer(x).sum().backward()
    loss_calls = 3  # the loss's sum, and ones_like and expand in its backward
    launched = sum(mode.calls.values()) - mode.calls["detach"] - loss_calls
    assert launched == EXPECTED_TRAINING_CALLS[bias], mode.calls
    assert mode.calls["where"] == 4 and not (mode.calls["copy_"] or mode.calls["clone"] or mode.calls["scalar_tensor"])


@pytest.mark.parametrize("case", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_ca_gradients_of_gradients_and_per_example_gradients(case, bias):
    """The written-out backward (and forward mode) are exact to second order and under torch.func's vmap and grad."""
    make, _, shape, _ = CASES[case]
    layer = make_sr(_dense(make, bias), "ca", S_IN, S_OUT)
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn((2, *shape[1:]), dtype=torch.float64, requires_grad=True)

    def run(inp, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (inp,))

    params = tuple(layer.parameters())
    assert torch.autograd.gradcheck(run, (x, *params), check_forward_ad=True)  # forward mode too (jvp)
    assert torch.autograd.gradgradcheck(run, (x, *params), check_fwd_over_rev=True)  # as torch.func.hessian

    def loss(p, example):
        return torch.func.functional_call(layer, p, (example.unsqueeze(0),)).square().sum()

    detached = {name: p.detach() for name, p in layer.named_parameters()}
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(detached, x.detach())
    for i in range(2):
        one = torch.func.grad(loss)(detached, x.detach()[i])
        for name in names:
            torch.testing.assert_close(per_example[name][i], one[name])


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_vmap_and_forward_mode_with_and_without_grad(scheme, grad):
    """vmap, torch.func.jvp and forward-AD duals give the block formula's values and tangents (no out= call there)."""
    make, _, shape, op = CASES[1]
    dense = _dense(make, False)
    layer = make_sr(dense, scheme, S_IN, S_OUT)
    x, tangent = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    expected, expected_tangent = torch.func.jvp(lambda inp: _reference(dense, inp, scheme, op), (x,), (tangent,))
    with torch.set_grad_enabled(grad):
        batched = torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1)
        _, pushed = torch.func.jvp(layer, (x,), (tangent,))
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent)))
    for got, want in ((batched, expected), (pushed, expected_tangent), (dual.primal, expected),
                      (dual.tangent, expected_tangent)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_traced_and_exported_layers_record_aten_ops_only(scheme):
    """torch.jit.trace (TorchScript's ONNX export) and torch.export see the mask form, not a Python function."""
    layer = make_sr(_dense(lambda: nn.Conv2d(7, 9, 3, padding=1), True), scheme, S_IN, S_OUT)
    x = torch.randn(4, 7, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated (torch 2.14)
        traced = torch.jit.trace(layer, (x,))
    assert not [node for node in traced.graph.nodes() if node.kind() == "prim::PythonOp"]
    exported = torch.export.export(layer, (x,))
    for module in (traced, exported.module()):
        torch.testing.assert_close(module(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_ca_gate_without_autograd_equals_the_differentiable_one(bias):
    dense = _dense(lambda: nn.Conv2d(16, 24, 1), bias)
    layer = make_sr(dense, "ca", 8, 16)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x).detach(), rtol=1e-12, atol=1e-12)
