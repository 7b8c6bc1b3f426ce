"""Attention weights as pictures: shaded text for the terminal, heatmaps in a PNG.

Both draw the same ``Heatmap`` panels side by side, on one shared colour scale (0 to the largest
weight shown) so that the panels can be compared cell by cell.  Cells a query may not attend to are
left blank.  matplotlib (the ``demo`` extra) is imported only when a PNG is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Terminal shades, one per fifth of the largest weight; a blank cell is one the query cannot see.
SHADES = "·░▒▓█"
DPI = 100


@dataclass(frozen=True)
class Heatmap:
    """One panel: a weight matrix whose rows are the tokens (queries)."""

    title: str
    weights: list[list[float]]  # (rows, columns)
    visible: list[list[bool]]  # (rows, columns); False = not attended, drawn blank
    column_labels: list[str]
    caption: str = "attends to"  # under the columns of the PNG
    column_breaks: tuple[int, ...] = ()  # a line is drawn before each of these columns
    row_breaks: tuple[int, ...] = ()  # and above each of these rows


def shade(panels: list[Heatmap], row_labels: list[str], *, highlight_row: int | None = None) -> str:
    """The panels side by side as text, two characters per cell, each column headed by the initial
    of its label (short names such as "G1" whole); ``highlight_row`` is marked with an arrow."""
    top = _largest_weight(panels)
    label_width = max(map(len, row_labels)) + 3  # arrow, label, space
    breaks = sorted({r for p in panels for r in p.row_breaks})
    lines = [" " * label_width + "   ".join(_pad(p.title, _panel_width(p)) for p in panels)]
    lines.append(" " * label_width + "   ".join(_shade_row(p, list(map(_initial, p.column_labels))) for p in panels))
    for row, label in enumerate(row_labels):
        if row in breaks:
            rules = ("─" * _panel_width(p) if row in p.row_breaks else " " * _panel_width(p) for p in panels)
            lines.append(" " * label_width + "   ".join(rules))
        marker = "▶ " if row == highlight_row else "  "
        cells = (_shade_row(p, [_cell(w, v, top) for w, v in zip(p.weights[row], p.visible[row])]) for p in panels)
        lines.append(f"{marker}{label:>{label_width - 3}} " + "   ".join(cells))
    fifths = "  ".join(f"{s} {'<' if i < 4 else '≥'}{min(i + 1, 4) * top / 5:.2f}" for i, s in enumerate(SHADES))
    lines.append(f"{' ' * label_width}weight: {fifths}   blank: not attended")
    return "\n".join(line.rstrip() for line in lines)


def figure_inches(panels: list[Heatmap], row_labels: list[str]) -> tuple[float, float]:
    """Width and height of the PNG in inches: square cells, small enough for long sentences, and
    room for the longest label."""
    cell, font = _cell_and_font(panels, row_labels)
    longest = max(len(label) for label in [*row_labels, *(c for p in panels for c in p.column_labels)])
    label = 0.6 * longest * font / 72  # an average character is about 0.6 em wide
    columns = sum(len(p.column_labels) for p in panels)
    return round(columns * cell + len(panels) * (label + 0.5) + 1.3, 2), round(len(row_labels) * cell + label + 1.4, 2)


def save_png(
    panels: list[Heatmap],
    row_labels: list[str],
    path: str | Path,
    *,
    title: str,
    highlight_row: int | None = None,
) -> Path:
    """Draw the panels as heatmaps side by side with one colour bar; write a PNG of
    ``figure_inches(...)`` at ``DPI``.  Returns the path."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone
    from matplotlib.patches import Rectangle

    path = Path(path)
    columns = [len(p.column_labels) for p in panels]
    cell, font = _cell_and_font(panels, row_labels)
    fig = Figure(figsize=figure_inches(panels, row_labels), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": columns})[0]
    top = _largest_weight(panels)
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # viridis never reaches white
    for ax, panel in zip(axes, panels):
        hidden = ~np.array(panel.visible)
        image = ax.imshow(
            np.ma.masked_array(np.array(panel.weights), mask=hidden),
            cmap=colours,
            vmin=0.0,
            vmax=top,
            interpolation="nearest",
        )
        ax.set_xticks(range(len(panel.column_labels)), panel.column_labels, rotation=90, fontsize=font)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=font)
        ax.tick_params(length=0)
        for column in panel.column_breaks:
            ax.axvline(column - 0.5, color="black", linewidth=1.5)
        for row in panel.row_breaks:
            ax.axhline(row - 0.5, color="black", linewidth=1.5)
        if highlight_row is not None:
            ax.add_patch(
                Rectangle((-0.5, highlight_row - 0.5), len(panel.column_labels), 1, fill=False, color="red", lw=2)
            )
            ax.get_yticklabels()[highlight_row].set(color="red", fontweight="bold")
            for column, (weight, seen) in enumerate(zip(panel.weights[highlight_row], panel.visible[highlight_row])):
                if seen and cell >= 0.3:  # the weights the report lists, in place; dark ink on the light end
                    ink = "black" if weight > 0.6 * top else "white"
                    label = f"{weight:.2f}".removeprefix("0")
                    ax.text(column, highlight_row, label, ha="center", va="center", fontsize=7, color=ink)
        ax.set_title(panel.title, fontsize=11)
        ax.set_xlabel(panel.caption)
    axes[0].set_ylabel("token")
    fig.colorbar(image, ax=list(axes), label="attention weight (blank: not attended)", shrink=0.8)
    fig.suptitle(title, fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _cell_and_font(panels: list[Heatmap], row_labels: list[str]) -> tuple[float, float]:
    """The side of a cell in inches, and the labels' font size in points (no taller than a cell)."""
    cell = min(0.34, 14.0 / sum(len(p.column_labels) for p in panels), 9.0 / len(row_labels))
    return cell, min(10.0, 0.8 * cell * 72)


def _largest_weight(panels: list[Heatmap]) -> float:
    cells = (w for p in panels for row, vis in zip(p.weights, p.visible) for w, v in zip(row, vis) if v)
    return max(cells, default=0.0) or 1.0


def _cell(weight: float, visible: bool, top: float) -> str:
    if not visible:
        return "  "
    return SHADES[min(int(5 * weight / top), 4)] * 2


def _initial(label: str) -> str:
    return label if len(label) == 2 and label[-1].isdigit() else label[0]


def _shade_row(panel: Heatmap, cells: list[str]) -> str:
    """Cells as text, with a bar before each column break."""
    return "".join(("│" if c in panel.column_breaks else "") + f"{cell:<2}" for c, cell in enumerate(cells))


def _panel_width(panel: Heatmap) -> int:
    return 2 * len(panel.column_labels) + len(panel.column_breaks)


def _pad(text: str, width: int) -> str:
    return text[:width].ljust(width)
