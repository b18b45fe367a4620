"""S/R layers (paper Sec. 3.3): a conv or linear whose channels are ordered [S…, R…] on both sides.

The split is a property of the stored layout: each layer holds, as its own contiguous
parameters, exactly the weight blocks its scheme computes, so a forward launches what the
maths needs and never slices or copies a weight.

``cr`` (cross connections removed): ``weight_ss``, ``weight_rr`` (and ``bias_s``, ``bias_r``);
S_out = W_SS*S_in, R_out = W_RR*R_in: one split of the input, two convolutions, one cat.
The cross blocks are not stored (they are zero and never trained).

``ca`` (cross attention, Eq. 9–10): ``weight_s_in`` = [W_SS; W_RS] (every output row from the S
inputs) and ``weight_r_in`` = [W_SR; W_RR] (and ``bias_all``).  Two convolutions give
a = W_·S*S and b = W_·R*R; the diagonal d = [a_S; b_R] and the cross terms c = [b_S; a_R] are
picked by one row mask, then out = d + 2σ(d)·c (one addcmul).  With autograd the backward of
that gate is written out (``_CrossAttention``: 7 calls where autograd's own takes 16, exact
to second order); without autograd the same formula is written into ``a`` half by half (two
passes over the output instead of four); under ``torch.compile``, ``torch.export`` and
``torch.jit.trace`` the plain mask form is kept (its gate fuses into one kernel, in-place writes
into strided halves would break the graph, and a trace records aten ops, not a Python function).

The layer still *reads* as the dense layer it replaces: ``weight`` and ``bias`` are
properties assembling the full tensors (zeros for cr's cross blocks), and ``in_channels``,
``out_channels``, ``in_features``, ``out_features`` stay true.  ``to_dense`` gives the plain
layer back; ``blocks_of``/``join_blocks`` move any full-shape tensor (optimizer state) into
and out of the stored layout.  This module imports only torch.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.ops.optable import keeps_behaviour

__all__ = ["SRConv1d", "SRConv2d", "SRConv3d", "SRLinear", "SR_LAYERS", "SR_CLASSES", "sr_class", "unused_weights",
           "make_sr", "to_dense", "block_names", "blocks_of", "join_blocks", "dense_names", "dense_numel",
           "like_layout", "zeros_like_layout"]

_ALL = slice(None)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # dims → the channels-last format of that rank


class _SRMixin:
    """A conv/linear stored as the blocks of its scheme; forward = the scheme's block formula."""

    scheme: str
    s_in: int
    s_out: int

    # -- what the layer reads as ------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [S…, R…] × [S…, R…] assembled from the blocks (cr: zero cross blocks); read-only copy."""
        return join_blocks(self, "weight", {n: self._parameters[n] for n in block_names(self, "weight")})

    @property
    def bias(self) -> torch.Tensor | None:
        """The dense bias assembled from the blocks (a read-only copy), or None."""
        names = block_names(self, "bias")
        return join_blocks(self, "bias", {n: self._parameters[n] for n in names}) if names else None

    def _dense_shape(self, attr: str) -> tuple[int, ...]:
        """Shape of the dense ``weight`` or ``bias``."""
        out, inp = (self.out_features, self.in_features) if isinstance(self, nn.Linear) else \
            (self.out_channels, self.in_channels)
        return (out,) if attr == "bias" else (out, inp, *getattr(self, "kernel_size", ()))

    def _specs(self) -> list[tuple[str, str, tuple[slice, ...]]]:
        """(parameter, dense attribute, index of its block in the dense tensor) of every stored block."""
        s, r = slice(0, self.s_out), slice(self.s_out, None)
        si, ri = slice(0, self.s_in), slice(self.s_in, None)
        if self.scheme == "cr":
            return [("weight_ss", "weight", (s, si)), ("weight_rr", "weight", (r, ri)),
                    ("bias_s", "bias", (s,)), ("bias_r", "bias", (r,))]
        return [("weight_s_in", "weight", (_ALL, si)), ("weight_r_in", "weight", (_ALL, ri)),
                ("bias_all", "bias", (_ALL,))]

    def _bias_shape(self) -> tuple[int, ...]:
        """ca's bias is stored broadcastable against the output: (out,) for linear, (out, 1, …) for convs."""
        return self._dense_shape("bias") + (1,) * len(getattr(self, "kernel_size", ()))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward over the channel dim (last for linear, before the kernel dims for convs)."""
        if isinstance(self, nn.Linear):
            dim, op = x.dim() - 1, F.linear
        else:
            dim, op = x.dim() - len(self.kernel_size) - 1, self._conv_forward
        xs, xr = torch.split(x, (self.s_in, x.shape[dim] - self.s_in), dim)
        if self.scheme == "cr":
            return torch.cat((op(xs, self.weight_ss, self.bias_s), op(xr, self.weight_rr, self.bias_r)), dim)
        a, b = op(xs, self.weight_s_in, None), op(xr, self.weight_r_in, None)
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # compiled: the gate fuses into one kernel;
            return _cross_attention(a, b, self.s_rows, self.bias_all)  # a jit trace keeps aten ops (no PythonOp)
        if torch.is_grad_enabled():  # also forward mode (jvp) and torch.func's transforms
            return _CrossAttention.apply(a, b, self.s_rows, self.bias_all)[0]
        if self.bias_all is not None or not _plain(a):
            return _cross_attention(a, b, self.s_rows, self.bias_all)
        return _cross_attention_into(a, b, self.s_out, dim)


def _plain(tensor: torch.Tensor) -> bool:
    """Not under vmap or another torch.func transform, nor forward-mode AD: out= calls have no rule there."""
    dual_level = getattr(torch.autograd.forward_ad, "_current_level", -1)
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor) and dual_level < 0


def _cross_attention(a: torch.Tensor, b: torch.Tensor, s_rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The mask form of Eq. 9–10, left to autograd (or to a compiler): ``_CrossAttention``'s forward."""
    return _CrossAttention.forward(a, b, s_rows, bias)[0]


class _CrossAttention(torch.autograd.Function):
    """``_cross_attention`` with its backward written out: 7 aten calls where autograd's own takes 16.

    Autograd differentiates the two row selections as four more selections, four scalar tensors
    and three sums.  Here the backward is g_d = g·(1 + 2c·σ'(d)), g_c = 2g·σ(d), then
    g_a = [g_d S rows; g_c R rows] and g_b = the other rows (g_bias = g_d summed).  It saves what
    autograd's own saves, σ(d) and c, and returns them as outputs next to the result (unused by
    the layer) so that double backward stays exact: a gradient reaching them comes back here.
    Forward mode has its rule (``jvp``: torch.func.jvp, jacfwd, hessian); vmap's is generated.
    ``torch.compile``, export and jit tracing take the mask form (its gate fuses anyway).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor, s_rows: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From a = W_·S*S and b = W_·R*R: d = [a_S; b_R] (+ bias), c = [b_S; a_R]; d + 2σ(d)·c, σ(d), c."""
        diag, cross = torch.where(s_rows, a, b), torch.where(s_rows, b, a)
        if bias is not None:
            diag = diag + bias
        gate = torch.sigmoid(diag)
        return torch.addcmul(diag, gate, cross, value=2), gate, cross

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.bias_shape = None if inputs[3] is None else inputs[3].shape
        ctx.dtypes = inputs[0].dtype, inputs[1].dtype
        ctx.save_for_backward(inputs[2], output[1], output[2])
        ctx.save_for_forward(inputs[2], output[1], output[2])

    @staticmethod
    def jvp(ctx, a_t: torch.Tensor | None, b_t: torch.Tensor | None, _: None, bias_t: torch.Tensor | None):
        """Forward mode (jvp, jacfwd): d_t, c_t by the mask, σ_t = σ'(d)·d_t, out_t = d_t + 2(σ_t·c + σ·c_t)."""
        s_rows, gate, cross = ctx.saved_tensors
        a_t = torch.zeros_like(gate) if a_t is None else a_t
        b_t = torch.zeros_like(gate) if b_t is None else b_t
        diag_t, cross_t = torch.where(s_rows, a_t, b_t), torch.where(s_rows, b_t, a_t)
        if bias_t is not None:
            diag_t = diag_t + bias_t
        gate_t = torch.ops.aten.sigmoid_backward(diag_t, gate)
        out_t = diag_t + 2 * (gate_t * cross + gate * cross_t)
        return out_t, gate_t, cross_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_gate: torch.Tensor | None, grad_cross: torch.Tensor | None):
        s_rows, gate, cross = ctx.saved_tensors
        grad_diag = grad_c = None
        if grad is not None:
            grad_diag = torch.add(grad, torch.ops.aten.sigmoid_backward(grad * cross, gate), alpha=2)
            grad_c = (grad * gate) * 2
        if grad_gate is not None:  # only in double backward: a gradient reached σ(d) itself
            via_gate = torch.ops.aten.sigmoid_backward(grad_gate, gate)
            grad_diag = via_gate if grad_diag is None else grad_diag + via_gate
        if grad_cross is not None:
            grad_c = grad_cross if grad_c is None else grad_c + grad_cross
        grad_diag = torch.zeros_like(gate) if grad_diag is None else grad_diag
        grad_c = torch.zeros_like(cross) if grad_c is None else grad_c
        grad_a = torch.where(s_rows, grad_diag, grad_c).to(ctx.dtypes[0])
        grad_b = torch.where(s_rows, grad_c, grad_diag).to(ctx.dtypes[1])
        grad_bias = grad_diag.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        return grad_a, grad_b, None, grad_bias


def _cross_attention_into(a: torch.Tensor, b: torch.Tensor, s_out: int, dim: int) -> torch.Tensor:
    """Eq. 9–10 without autograd, written into ``a``: S rows a_S + 2σ(a_S)·b_S, R rows b_R + 2σ(b_R)·a_R.

    The same formula as ``_cross_attention`` in two passes over the output instead of four: each
    row of ``a`` is read (as the S diagonal or as the R cross term) before it is written.  Layers
    with a bias take the mask form instead: adding it here would cost three more calls (a split and
    two adds) than the mask form's one, and a launch costs more than a pass on small layers.
    """
    (a_s, a_r), (b_s, b_r) = (t.split((s_out, t.shape[dim] - s_out), dim) for t in (a, b))
    torch.addcmul(a_s, torch.sigmoid(a_s), b_s, value=2, out=a_s)
    torch.addcmul(b_r, torch.sigmoid(b_r), a_r, value=2, out=a_r)
    return a


class SRConv1d(_SRMixin, nn.Conv1d):
    """Conv1d trained with the cr or ca scheme."""


class SRConv2d(_SRMixin, nn.Conv2d):
    """Conv2d trained with the cr or ca scheme."""


class SRConv3d(_SRMixin, nn.Conv3d):
    """Conv3d trained with the cr or ca scheme."""


class SRLinear(_SRMixin, nn.Linear):
    """Linear trained with the cr or ca scheme."""


SR_CLASSES: dict[type, type] = {nn.Conv1d: SRConv1d, nn.Conv2d: SRConv2d, nn.Conv3d: SRConv3d, nn.Linear: SRLinear}
SR_LAYERS: tuple[type, ...] = tuple(SR_CLASSES.values())
_BASE: dict[type, type] = {sr: base for base, sr in SR_CLASSES.items()}
_DENSE_CLASS = "nrfx_dense_class"  # an S/R layer made from a subclass of a plain layer keeps that class here


def block_names(layer: nn.Module, attr: str) -> tuple[str, ...]:
    """The stored parameters that hold a dense ``weight`` or ``bias`` of an S/R layer (the name itself otherwise)."""
    if not isinstance(layer, SR_LAYERS):
        return (attr,) if getattr(layer, attr, None) is not None else ()
    return tuple(name for name, dense, _ in layer._specs() if dense == attr and layer._parameters.get(name) is not None)


def blocks_of(layer: nn.Module, attr: str, dense: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense-shaped tensor of ``attr`` (a weight, its gradient, its momentum) cut into the layer's stored blocks."""
    if not isinstance(layer, SR_LAYERS):
        return {attr: dense}
    return {name: like_layout(_stored_shape(layer, name, dense[index]), dense)
            for name, a, index in layer._specs() if a == attr}


def like_layout(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rule: ``new`` dense in ``old``'s memory format: channels-last where the user keeps ``old`` so
    (``model.to(memory_format=torch.channels_last)``), else contiguous."""
    return new.contiguous(memory_format=_memory_format(old))


def zeros_like_layout(shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` in ``like``'s dtype, device and memory format (a resized copy of ``like`` to fill)."""
    return like_layout(torch.zeros(shape, dtype=like.dtype, device=like.device), like)


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for a tensor dense in that format only, else contiguous_format."""
    layout = _CHANNELS_LAST.get(tensor.dim())
    if layout is not None and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=layout):
        return layout
    return torch.contiguous_format


def join_blocks(layer: nn.Module, attr: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor of ``attr`` from the stored blocks (zeros where no block is stored); a detached copy."""
    if not isinstance(layer, SR_LAYERS):
        return parts[attr]
    first = next(iter(parts.values()))
    dense = zeros_like_layout(layer._dense_shape(attr), first)
    with torch.no_grad():
        for name, a, index in layer._specs():
            if a == attr and name in parts:
                dense[index] = parts[name].reshape(dense[index].shape)
    return dense


def _stored_shape(layer: _SRMixin, name: str, block: torch.Tensor) -> torch.Tensor:
    """A dense block in the shape the layer stores it (ca's bias: broadcastable over the output)."""
    return block.reshape(layer._bias_shape()) if name == "bias_all" else block


def sr_class(layer: nn.Module) -> type | None:
    """The S/R class of a plain conv/linear, or of a subclass that computes what its base does (``keeps_behaviour``:
    a ``Conv2d`` with its own ``__init__``); None for any other module."""
    base = next((b for b in type(layer).__mro__ if b in SR_CLASSES), None)
    return SR_CLASSES[base] if base is not None and keeps_behaviour(type(layer), base, layer) else None


def make_sr(layer: nn.Module, scheme: str, s_in: int, s_out: int) -> nn.Module:
    """The S/R form of a plain conv/linear (or a re-split S/R layer): its blocks copied, the rest of it kept (a
    subclass's class too: ``to_dense`` gives it back)."""
    dense = to_dense(layer)
    new = _shell(dense, sr_class(dense))
    new.__dict__.update(scheme=scheme, s_in=int(s_in), s_out=int(s_out))
    if type(dense) not in SR_CLASSES:
        new.__dict__[_DENSE_CLASS] = type(dense)
    weight, bias = dense._parameters["weight"], dense._parameters.get("bias")
    new._parameters = {k: v for k, v in dense._parameters.items() if k not in ("weight", "bias")}  # a subclass's own
    for attr, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        for name, block in blocks_of(new, attr, tensor.detach()).items():
            new._parameters[name] = nn.Parameter(block.clone(), requires_grad=tensor.requires_grad)
    if scheme == "ca":
        rows = (torch.arange(new._dense_shape("bias")[0], device=weight.device) < s_out).reshape(new._bias_shape())
        new.register_buffer("s_rows", rows, persistent=False)
    if bias is None:  # the bias blocks exist as None, as a plain layer's bias does
        new._parameters.update({name: None for name, attr, _ in new._specs() if attr == "bias"})
    return new


def to_dense(layer: nn.Module) -> nn.Module:
    """The plain layer an S/R layer stands for (dense weight and bias as parameters); other layers unchanged."""
    if not isinstance(layer, SR_LAYERS):
        return layer
    weight, bias = layer.weight.detach(), layer.bias
    requires_grad = next(iter(layer.parameters())).requires_grad
    dense = _shell(layer, layer.__dict__.get(_DENSE_CLASS, _BASE[type(layer)]))
    for key in ("scheme", "s_in", "s_out", _DENSE_CLASS):
        dense.__dict__.pop(key, None)
    dense._buffers.pop("s_rows", None)
    dense._non_persistent_buffers_set.discard("s_rows")
    blocks = {name for name, _, _ in layer._specs()}
    dense._parameters = {"weight": nn.Parameter(weight.clone(), requires_grad=requires_grad),
                         "bias": None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad),
                         **{k: v for k, v in layer._parameters.items() if k not in blocks}}  # a subclass's own
    return dense


def _shell(layer: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` with the layer's attributes, hooks and buffers (own containers, shared tensors)."""
    new = cls.__new__(cls)
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in layer.__dict__.items()}
    return new


def dense_names(model: nn.Module) -> dict[str, str]:
    """Stored block name -> the dense parameter it belongs to, for every S/R layer in ``model`` (others: absent)."""
    names: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, SR_LAYERS):
            prefix = f"{path}." if path else ""
            names.update({prefix + name: prefix + attr for name, attr, _ in module._specs()
                          if module._parameters.get(name) is not None})
    return names


def dense_numel(model: nn.Module, name: str) -> int:
    """Elements of a parameter as the dense model has it (an S/R layer's ``weight``/``bias`` at full size)."""
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    if isinstance(owner, SR_LAYERS) and attr in ("weight", "bias"):
        return math.prod(owner._dense_shape(attr))
    return model.get_parameter(name).numel()


def unused_weights(layer: nn.Module) -> int:
    """Weight entries the dense form counts that an S/R layer does not store (nor compute): cr's cross blocks."""
    if not isinstance(layer, SR_LAYERS):
        return 0
    stored = sum(layer._parameters[name].numel() for name in block_names(layer, "weight"))
    return math.prod(layer._dense_shape("weight")) - stored
