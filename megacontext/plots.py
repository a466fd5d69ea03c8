"""Pictures researchers look at instead of tables: training curves and the LOD map of a working context.

Both write a PNG (Agg, no display, no timestamps in the file). `png_markdown`
embeds a PNG in Markdown as a data URI, which is how Dagster asset metadata
shows it in the UI without serving files.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from megacontext.context.nodes import Node, span

LOD_COLOURS = {0: "#2b83ba", 1: "#fdae61", 2: "#d7191c"}  # tokens, LOD1 gists, LOD2 gists


def plot_telemetry(rows: Sequence[Mapping[str, float]], path: Path, *, title: str,
                   keys: Sequence[str] = ("loss", "delta_nll", "swap_rate", "tokens_per_s")) -> Path:
    """One small panel per telemetry key that the rows carry (loss, ΔNLL@H, swap rate, tokens/s)."""
    keys = [k for k in keys if rows and k in rows[0]]
    fig = Figure(figsize=(3.2 * max(len(keys), 1), 2.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, keys):
        ax.plot(steps, [r[key] for r in rows], marker="." if len(rows) < 40 else None, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def plot_lod_map(entries: Sequence[Node], cursor: int, path: Path, *, title: str, w_max: int | None = None) -> Path:
    """Which spans of the history the working context holds at which level of detail, along the document."""
    fig = Figure(figsize=(10, 1.9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for node in entries:
        ax.add_patch(Rectangle((node.start, 0), span(node.level), 1, color=LOD_COLOURS[min(node.level, 2)], linewidth=0))
    counts = {level: sum(1 for n in entries if n.level == level) for level in sorted({n.level for n in entries})}
    legend = [Rectangle((0, 0), 1, 1, color=LOD_COLOURS[min(level, 2)]) for level in counts]
    labels = [f"LOD{level}: {count} entries" for level, count in counts.items()]
    ax.legend(legend, labels, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(labels), fontsize=8, frameon=False)
    ax.set_xlim(0, max(cursor, 1))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("history position (tokens)", fontsize=8)
    budget = f" / W_max {w_max:,}" if w_max else ""
    ax.set_title(f"{title}: {len(entries):,} entries{budget} cover {cursor:,} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def png_markdown(path: Path, alt: str) -> str:
    """Markdown showing the PNG inline (data URI)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"
