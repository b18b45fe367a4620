"""Per-layer report of an analysis: channels, params and MACs (total and live), frozen reasons.

Rows are the layers the analysis recorded (conv, linear, norm, embedding), every other node
that costs MACs (matmul, attention, unknown ops) and every automatic leaf.  Each parameter is
claimed by the first row whose node reads it; parameters no row claims (PReLU slopes, modules
the trace never reaches, ...) form the ``(other)`` row, so the rows add up to c(A) and U(θ)
exactly, in params and in MACs.
"""

from __future__ import annotations

import html
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx

from nrfx.analysis.cost import Ratios
from nrfx.analysis.records import LayerRecord
from nrfx.analysis.reprs import format_count
from nrfx.layers.srlayers import dense_names, dense_numel

__all__ = ["Report", "Row", "Totals", "build_report", "format_count", "html_table", "TABLE_HEADER"]

OTHER = "(other)"
TABLE_HEADER = ["layer", "op", "in", "out", "params", "live", "MACs", "live", "frozen"]

LEGEND = """\
legend: c(A) the model's cost (parameters; MACs per example) · U(θ) the cost of its live channels
  (a channel is dead when its norm scale is 0 or below threshold × the norm's largest) · r(θ) = U(θ)/c(A)
  in/out: live/total channels of a layer's input and output · params, MACs: total, then live ·
  frozen: the side that keeps its width, and why · coverage: the share of channels in free spaces
  (nrfx may resize them) and in monitored ones (a norm scale or a gate tells which are alive)"""


@dataclass(frozen=True)
class Row:
    """One layer: live/total channels in and out, params and MACs per example, frozen reason."""

    name: str
    op: str
    kind: str
    in_live: int | None
    in_total: int | None
    out_live: int | None
    out_total: int | None
    params: int
    live_params: int
    macs: int
    live_macs: int
    frozen: str | None = None


@dataclass(frozen=True)
class Totals(Ratios):
    """c(A), U(θ) and r(θ) in params and MACs, and counts of spaces, unknown ops and leaves."""

    params: int
    live_params: int
    macs: int
    live_macs: int
    spaces: int
    frozen_spaces: int
    unknown_ops: int
    auto_leaves: int
    effective_params: int | None = None
    effective_macs: int | None = None


@dataclass(frozen=True)
class Report:
    """What an analysis found, per layer and in total; ``str()`` gives the table and totals."""

    model: str
    input_shapes: tuple[tuple[int, ...], ...]
    batch: int
    rows: tuple[Row, ...]
    other: Row
    totals: Totals
    frozen: tuple[tuple[int, int, str], ...] = ()
    unknown_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    auto_leaves: dict[str, str] = field(default_factory=dict)
    coverage: Any = None  # nrfx.Coverage: channels in free spaces, and with a liveliness signal
    capture: str = "fx"
    capture_notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data: rows, the (other) row, totals, frozen spaces, unknown ops, leaves."""
        totals = asdict(self.totals) | {"r_params": self.totals.r_params, "r_macs": self.totals.r_macs}
        return {
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "batch": self.batch,
            "macs_convention": "multiply-accumulates per example, bias excluded (torchvision _ops)",
            "rows": [asdict(r) for r in self.rows],
            "other": asdict(self.other),
            "totals": totals,
            "frozen_spaces": [{"space": i, "width": w, "reason": r} for i, w, r in self.frozen],
            "unknown_ops": {k: list(v) for k, v in self.unknown_ops.items()},
            "auto_leaves": dict(self.auto_leaves),
            "coverage": _coverage_dict(self.coverage),
            "capture": self.capture,
            "capture_notes": list(self.capture_notes),
        }

    def table(self, width: int = 150) -> str:
        """The per-layer rows as a text table (rich when installed, plain text otherwise)."""
        cells = [_cells(r) for r in (*self.rows, self.other)]
        try:
            return _rich_table(TABLE_HEADER, cells, width)
        except ImportError:
            return _plain_table(TABLE_HEADER, cells)

    def summary(self) -> str:
        """The totals: c(A), U(θ), r(θ), spaces, unknown ops and automatic leaves."""
        t = self.totals
        shapes = ", ".join("×".join(str(d) for d in s) for s in self.input_shapes)
        lines = [
            f"model {self.model}, input {shapes} (MACs per example, bias excluded), captured by {self.capture}",
            f"c(A)  params {t.params:,} ({format_count(t.params)})   MACs {t.macs:,} ({format_count(t.macs)})",
            f"U(θ)  params {t.live_params:,} ({format_count(t.live_params)})   "
            f"MACs {t.live_macs:,} ({format_count(t.live_macs)})",
            f"r(θ)  params {t.r_params:.4f}   MACs {t.r_macs:.4f}",
            *_effective_line(t),
            f"channel spaces {t.spaces}, frozen {t.frozen_spaces}, unknown ops {t.unknown_ops}, "
            f"automatic leaves {t.auto_leaves}",
            *_coverage_line(self.coverage),
        ]
        lines += [f"  {note}" for note in self.capture_notes]
        lines += [f"  unknown op {k}: {', '.join(v)}" for k, v in self.unknown_ops.items()]
        lines += [f"  automatic leaf {k}: {v}" for k, v in self.auto_leaves.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary() + "\n" + LEGEND


    def __repr__(self) -> str:
        """One line: model, rows, c(A), U(θ), r(θ) (``str()`` has the table, ``to_dict()`` the data)."""
        t = self.totals
        return (f"<nrfx.Report of {self.model}: {len(self.rows)} layers; c(A) {format_count(t.params)} params, "
                f"{format_count(t.macs)} MACs; U(θ) {format_count(t.live_params)} params, "
                f"{format_count(t.live_macs)} MACs; r(θ) params {t.r_params:.4f}, MACs {t.r_macs:.4f}; "
                f"{t.frozen_spaces}/{t.spaces} spaces frozen>")

    def _repr_html_(self) -> str:
        """Jupyter: the per-layer rows as an HTML table, then the totals."""
        return html_table(TABLE_HEADER, [_cells(r) for r in (*self.rows, self.other)]) + \
            "<pre>" + html.escape(self.summary()) + "</pre>"


# -- building ---------------------------------------------------------------------------------
def build_report(analysis, masks: dict[str, torch.Tensor] | None = None) -> Report:
    """Rows per layer and totals of ``analysis`` under ``masks`` (None: masks from the norms)."""
    util = analysis.utilization(masks)
    full = [s.width for s in analysis.spaces]
    live = [s.width if s.is_frozen else int(a.sum()) for s, a in zip(analysis.spaces, util.alive, strict=True)]
    owner = _param_owners(analysis.gm)
    owned: dict[str, list[str]] = {}
    for name, node_name in owner.items():
        owned.setdefault(node_name, []).append(name)
    nodes = _row_nodes(analysis, {t.owner for t in analysis.mac_cost.terms})
    rows = tuple(_row(analysis, node, owned.get(node.name, []), full, live) for node in nodes)
    other = _other_row(analysis, rows, owner, {n.name for n in nodes}, full, live, util)
    totals = Totals(util.params, util.live_params, util.macs, util.live_macs, len(analysis.spaces),
                    len(analysis.frozen_spaces), len(analysis.unknown_ops), len(analysis.auto_leaves),
                    analysis.effective_params, analysis.effective_macs)
    frozen = tuple((s.index, s.width, _first_reason(s.frozen)) for s in analysis.frozen_spaces)
    return Report(analysis.model_name, tuple(analysis.input_shapes), analysis.batch, rows, other, totals, frozen,
                  dict(analysis.unknown_ops), dict(analysis.auto_leaves), analysis.coverage(),
                  getattr(analysis, "capture", "fx"), tuple(getattr(analysis, "capture_notes", ())))


def _coverage_dict(cover) -> dict[str, Any] | None:
    """The coverage record as JSON-safe data (shares and channel counts)."""
    if cover is None:
        return None
    return {"channels": cover.channels, "free_channels": cover.free_channels,
            "monitored_channels": cover.monitored_channels, "free": cover.free, "monitored": cover.monitored,
            "unsignalled_spaces": list(cover.unsignalled)}


def _coverage_line(cover) -> list[str]:
    """One summary line: the shares of channels in free spaces and in monitored ones."""
    if cover is None:
        return []
    hint = "   (nrfx.add_gates gives the free spaces without a norm a gate)" if cover.unsignalled else ""
    return [f"coverage  free {cover.free:.1%}   monitored {cover.monitored:.1%} of {cover.channels:,} channels{hint}"]


def _row_nodes(analysis, with_macs: set[str]) -> list[torch.fx.Node]:
    """Nodes that get a row, in graph order: records, nodes with MACs, automatic leaves."""
    wanted = set(analysis.records) | with_macs
    leaves = set(analysis.auto_leaves)
    return [n for n in analysis.gm.graph.nodes
            if n.name in wanted or (n.op == "call_module" and n.target in leaves)]


def _param_owners(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Parameter name -> the first node that reads it (its module call or a get_attr's user)."""
    dense = dense_names(gm)  # an S/R layer's blocks are owned as its dense weight and bias
    names = {id(p): dense.get(n, n) for n, p in gm.named_parameters()}
    owner: dict[str, str] = {}
    for node in gm.graph.nodes:
        for tensor in _node_params(gm, node):
            name = names.get(id(tensor))
            if name is not None:
                owner.setdefault(name, node.name)
    return owner


def _node_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.Tensor]:
    """Parameters a node reads: its module's, or those fetched by get_attr nodes it takes."""
    if node.op == "call_module":
        return list(gm.get_submodule(node.target).parameters())
    if node.op in ("call_function", "call_method"):
        found = []
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = _fetch(gm, arg.target)
                if isinstance(value, torch.nn.Parameter):
                    found.append(value)
        return found
    return []


def _fetch(gm: torch.fx.GraphModule, target: str) -> Any:
    """The attribute a get_attr node reads (None when it cannot be found)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _param_sizes(analysis, name: str, size: int, full, live) -> tuple[int, int]:
    """(total, live) elements of one parameter; unclaimed parameters count whole."""
    info = analysis.param_info.get(name)
    if info is None or info.buffer:
        return size, size
    return analysis.param_cost.of(name, full), analysis.param_cost.of(name, live)


def _row(analysis, node: torch.fx.Node, mine: list[str], full, live) -> Row:
    """The row of one node: its channels, the parameters it owns, its MAC terms."""
    record = analysis.records.get(node.name)
    record = record if isinstance(record, LayerRecord) else None
    params = [_param_sizes(analysis, n, dense_numel(analysis.gm, n), full, live) for n in mine]
    macs = analysis.mac_cost.of(node.name, full), analysis.mac_cost.of(node.name, live)
    cin, cout = _static_channels(analysis, record)
    in_l, out_l = (record.input, record.output) if record is not None else (None, None)
    return Row(
        name=_row_name(node, record),
        op=_op_label(analysis.gm, node),
        kind=record.kind if record is not None else ("leaf" if _is_auto_leaf(analysis, node) else "op"),
        in_live=analysis.width(in_l, live) if in_l is not None else cin,
        in_total=analysis.width(in_l, full) if in_l is not None else cin,
        out_live=analysis.width(out_l, live) if out_l is not None else cout,
        out_total=analysis.width(out_l, full) if out_l is not None else cout,
        params=sum(p[0] for p in params),
        live_params=sum(p[1] for p in params),
        macs=macs[0],
        live_macs=macs[1],
        frozen=_frozen_reason(analysis, node, in_l, out_l),
    )


def _other_row(analysis, rows, owner, row_names: set[str], full, live, util) -> Row:
    """Parameters no row claims (and MACs lost to per-row rounding), so that rows add up."""
    dense = dense_names(analysis.gm)
    sizes = {dense.get(n, n): dense_numel(analysis.gm, dense.get(n, n)) for n, _ in analysis.gm.named_parameters()}
    unowned = [n for n in sizes if owner.get(n) not in row_names]
    claimed = sizes.keys() - set(unowned)
    # parameters outside the graph (never reached by the trace) count whole, as in c(A)
    unclaimed_total = analysis.param_cost.constant - sum(sizes[n] for n in claimed if _is_constant(analysis, n))
    params = [_param_sizes(analysis, n, sizes[n], full, live) for n in unowned if not _is_constant(analysis, n)]
    return Row(
        name=OTHER, op="-", kind="other", in_live=None, in_total=None, out_live=None, out_total=None,
        params=unclaimed_total + sum(p[0] for p in params),
        live_params=unclaimed_total + sum(p[1] for p in params),
        macs=util.macs - sum(r.macs for r in rows),
        live_macs=util.live_macs - sum(r.live_macs for r in rows),
    )


def _is_constant(analysis, name: str) -> bool:
    """Whether a parameter is counted whole (no rule registered its layouts)."""
    info = analysis.param_info.get(name)
    return info is None or info.buffer


def _static_channels(analysis, record: LayerRecord | None) -> tuple[int | None, int | None]:
    """(in, out) channels of a recorded layer read from its module or weight shape."""
    if record is None:
        return None, None
    module = record.module
    if module is not None:
        m = analysis.gm.get_submodule(module)
        for a, b in (("in_channels", "out_channels"), ("in_features", "out_features"), ("input_size", "hidden_size")):
            if hasattr(m, a):
                return getattr(m, a), getattr(m, b)
        if hasattr(m, "num_features"):
            return m.num_features, m.num_features
        if hasattr(m, "embedding_dim"):
            return None, m.embedding_dim
    info = analysis.param_info.get(record.weight or "")
    if info is None:
        return None, None
    shape, groups, kind = info.shape, record.groups, record.kind
    if kind == "linear" and len(shape) == 2:
        return shape[1], shape[0]
    if kind == "conv" and len(shape) > 2:
        return (shape[0], shape[1] * groups) if record.transposed else (shape[1] * groups, shape[0])
    return None, None


def _row_name(node: torch.fx.Node, record: LayerRecord | None) -> str:
    """Module name for module calls, the weight's name for functional layers, else the node name."""
    if node.op == "call_module":
        return str(node.target)
    return (record.weight if record is not None else None) or node.name


def _op_label(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Module type, function name or ``Tensor.method``."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _is_auto_leaf(analysis, node: torch.fx.Node) -> bool:
    """Whether the node calls a submodule that became a leaf because it could not be traced."""
    return node.op == "call_module" and node.target in analysis.auto_leaves


def _frozen_reason(analysis, node: torch.fx.Node, in_l, out_l) -> str | None:
    """Which side keeps its width and why: ``in: …``, ``out: …``, ``in+out: …`` (one reason), ``in: …; out: …``.

    None when both sides are free; an automatic leaf gives its own reason.
    """
    if _is_auto_leaf(analysis, node):
        return f"automatic leaf: {analysis.auto_leaves[node.target]}"
    side_in, side_out = _side_reason(analysis, in_l), _side_reason(analysis, out_l)
    if side_in is not None and side_in == side_out:
        return f"in+out: {side_in}"
    parts = [f"{side}: {reason}" for side, reason in (("in", side_in), ("out", side_out)) if reason is not None]
    return "; ".join(parts) or None


def _side_reason(analysis, layout) -> str | None:
    """The first freeze reason among the spaces of one side of a layer (None: free, or no channels)."""
    if layout is None:
        return None
    for s in analysis.space_ids(layout):
        if analysis.spaces[s].is_frozen:
            return _first_reason(analysis.spaces[s].frozen)
    return None


def _first_reason(reasons: tuple[str, ...]) -> str:
    """The first freeze reason, except that an automatic leaf (the root cause) comes first."""
    leaf = [r for r in reasons if r.startswith("automatic leaf")]
    return (leaf or list(reasons))[0]


def _effective_line(t: Totals) -> list[str]:
    """What runs, when S/R layers store weights they never compute (cr cross blocks); else nothing."""
    if t.effective_params in (None, t.params) and t.effective_macs in (None, t.macs):
        return []
    return [f"runs  params {t.effective_params:,} ({format_count(t.effective_params)})   MACs {t.effective_macs:,} "
            f"({format_count(t.effective_macs)}): cr S/R layers compute only their diagonal blocks; "
            "c(A) and budgets count the stored (dense) size"]


# -- formatting -------------------------------------------------------------------------------
def _fraction(live: int | None, total: int | None) -> str:
    """'live/total' channels, or '-' when the layer has none there."""
    if total is None:
        return "-"
    return f"{live}/{total}"


def _short_reason(reason: str | None, limit: int = 60) -> str:
    """A freeze reason without node locations, each side cut to its share of ``limit``; equal sides: ``in+out``."""
    if not reason:
        return ""
    head, _, out = reason.partition("; out: ")
    texts = [t.split(" [node ")[0] for t in (head, out) if t]
    if len(texts) == 2:  # in and out frozen for reasons that differ only by where
        texts = [f"in+out: {texts[1]}"] if texts[0] == f"in: {texts[1]}" else [texts[0], f"out: {texts[1]}"]
    each = (limit - 2 * (len(texts) - 1)) // len(texts)
    return "; ".join(t if len(t) <= each else t[: each - 1] + "…" for t in texts)


def _cells(row: Row) -> list[str]:
    """The table cells of one row."""
    return [row.name, row.op, _fraction(row.in_live, row.in_total), _fraction(row.out_live, row.out_total),
            format_count(row.params), format_count(row.live_params), format_count(row.macs),
            format_count(row.live_macs), _short_reason(row.frozen)]


def html_table(header: list[str], cells: list[list[str]]) -> str:
    """Rule: every cell HTML-escaped; count columns (3rd to 8th) right-aligned, as in the text table."""
    def row(values: list[str], tag: str) -> str:
        """One table row of escaped cells."""
        return "<tr>" + "".join(f'<{tag} style="text-align:{"right" if 2 <= i <= 7 else "left"}">'
                                f"{html.escape(v)}</{tag}>" for i, v in enumerate(values)) + "</tr>"

    body = "".join(row(r, "td") for r in cells)
    return f"<table><thead>{row(header, 'th')}</thead><tbody>{body}</tbody></table>"


def _rich_table(header: list[str], cells: list[list[str]], width: int) -> str:
    """Render with rich into a string (no colours, no terminal codes)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, title in enumerate(header):
        table.add_column(title, justify="right" if 2 <= i <= 7 else "left", overflow="fold")
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _plain_table(header: list[str], cells: list[list[str]]) -> str:
    """Fixed-width columns separated by two spaces."""
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = []
    for row in [header, ["-" * w for w in widths], *cells]:
        parts = [c.rjust(w) if 2 <= i <= 7 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
