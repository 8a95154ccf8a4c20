"""Human-readable rendering of a Topology: a summary line and one table row per sublayer."""

from __future__ import annotations

from .topology import NORM_KIND_LABELS, Layer, NormSite, Topology


def _norm_cell(norms: tuple[NormSite, ...], slot: str, layer_path: str) -> str:
    cells = [f"{n.path.removeprefix(layer_path + '.')} ({n.kind})" for n in norms if n.slot == slot]
    return ", ".join(cells) or "-"


def render_topology(topology: Topology) -> str:
    """The text that ``normswap inspect`` prints."""
    lines = [f"{topology.model_type} ({topology.model_class}): {topology.summary()}", ""]
    for stack in topology.stacks:
        embedding = _edge(stack.embedding_norm)
        final = _edge(stack.final_norm)
        width = f", width {stack.width}" if stack.width is not None else ""
        width += f" on axis {stack.axis} (channels first)" if stack.axis != -1 else ""
        lines.append(f"stack {stack.path or '(root)'}: {stack.layer_count()}{width}, "
                     f"embedding norm {embedding}, final norm {final}")
    lines.append("")
    header = ("layer", "sublayer", "placement", "pre", "post", "out", "residual add")
    rows = [header]
    for layer in topology.layers:
        for position, sub in enumerate(layer.sublayers):
            branches = "+".join(b.kind for b in sub.branches) if sub.kind == "parallel" else sub.kind
            rows.append((
                _layer_cell(layer) if position == 0 else "",
                branches,
                sub.placement,
                _norm_cell(sub.norms, "pre", layer.path),
                _norm_cell(sub.norms, "post", layer.path),
                _norm_cell(sub.norms, "out", layer.path),
                sub.residual_add or "?",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    inner = sorted({n.path.split(".")[-1] + f" ({n.kind}, dim {n.dim})" for layer in topology.layers
                    for n in layer.inner_norms})
    if inner:
        lines += ["", "norms inside branches (q/k norms, not residual norms): " + ", ".join(inner)]
    for note in topology.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _layer_cell(layer: Layer) -> str:
    """The layer's path; for a layer of list items (XLM), its index in the lists: ``[0]``."""
    if layer.items:
        return f"{layer.path}[{layer.index}]" if layer.path else f"[{layer.index}]"
    return layer.path


def _edge(norm: NormSite | None) -> str:
    if norm is None:
        return "none"
    eps = f", eps {norm.eps:g}" if norm.eps is not None else ""
    return f"{norm.path} ({NORM_KIND_LABELS.get(norm.kind, norm.kind)}{eps})"
