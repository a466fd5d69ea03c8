"""`megacontext inspect`: which spans of a document are in focus at which LOD, over time.

From the runtime's refocus snapshots it draws a PNG (one row per chosen point
in time: the working context's LOD map along the document, LensNet's scores
over it) and writes an HTML page: a table of the snapshots and the document's
text as the base model saw it at the last point, each span coloured by its
level, with its LensNet score on hover.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from megacontext.context.nodes import Node, span
from megacontext.plots import LOD_COLOURS
from megacontext.runtime.streaming import Snapshot
from megacontext.model.tokenizer import TextTokenizer

GIST_PREVIEW = 48  # characters of a gist's underlying text shown in the HTML (the rest on hover)


def choose(snapshots: Sequence[Snapshot], points: int) -> list[Snapshot]:
    """`points` snapshots spread evenly over time, the last one always included."""
    if not snapshots:
        return []
    picks = np.unique(np.linspace(0, len(snapshots) - 1, num=min(points, len(snapshots))).round().astype(int))
    return [snapshots[i] for i in picks]


def level_counts(entries: Sequence[Node]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in entries:
        counts[node.level] = counts.get(node.level, 0) + 1
    return dict(sorted(counts.items()))


def plot_focus_timeline(snapshots: Sequence[Snapshot], path: Path, *, title: str, w_max: int) -> Path:
    """One row per snapshot: coloured LOD spans of the WC after the refocus, LensNet scores before it."""
    end = max(s.cursor for s in snapshots)
    fig = Figure(figsize=(11, 0.9 + 0.75 * len(snapshots)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row, snap in enumerate(reversed(snapshots)):
        y = row * 1.25
        for node in snap.entries:
            ax.add_patch(Rectangle((node.start, y), span(node.level), 0.5, color=LOD_COLOURS[min(node.level, 2)],
                                   linewidth=0))
        if len(snap.scores):  # scores in [-1, 1] drawn in the band above the bar
            xs = np.array([[n.start, n.end] for n in snap.scored], dtype=float).ravel()
            ys = np.repeat(np.asarray(snap.scores, dtype=float), 2)
            ax.plot(xs, y + 0.8 + 0.2 * ys, color="black", linewidth=0.6)
            ax.axhline(y + 0.8, color="grey", linewidth=0.3, linestyle=":")
        counts = ", ".join(f"L{k}:{v}" for k, v in level_counts(snap.entries).items())
        ax.text(end * 1.005, y + 0.25, f"t={snap.cursor:,}  {len(snap.entries)}/{w_max}  {counts}", fontsize=7,
                va="center")
    ax.set_xlim(0, end * 1.25)
    ax.set_ylim(-0.2, 1.25 * len(snapshots))
    ax.set_yticks([])
    ax.set_xlabel("document position (tokens)", fontsize=8)
    ax.tick_params(labelsize=7)
    handles = [Patch(color=LOD_COLOURS[k], label=f"LOD{k}" + (" tokens" if k == 0 else " gists")) for k in (0, 1, 2)]
    handles.append(Patch(color="black", label="LensNet score (+expand / −collapse)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.4, -0.25 if len(snapshots) > 2 else -0.5),
              ncol=4, fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def write_html(snapshots: Sequence[Snapshot], tokens: np.ndarray, tokenizer: TextTokenizer, path: Path, *,
               title: str, picture: str, w_max: int) -> Path:
    """The snapshot table and the last snapshot's document text, each entry coloured by its level."""
    last = snapshots[-1]
    scores = dict(zip(last.scored, np.asarray(last.scores, dtype=float).tolist())) if len(last.scores) else {}
    rows = []
    for snap in snapshots:
        counts = level_counts(snap.entries)
        mean = f"{float(np.mean(snap.scores)):+.3f}" if len(snap.scores) else "—"
        rows.append(f"<tr><td>{snap.cursor:,}</td><td>{len(snap.entries)}/{w_max}</td>"
                    + "".join(f"<td>{counts.get(k, 0)}</td>" for k in (0, 1, 2))
                    + f"<td>{sum(e.action == 'expand' for e in snap.edits)}</td>"
                    f"<td>{sum(e.action == 'collapse' for e in snap.edits)}</td><td>{mean}</td></tr>")
    spans = []
    i = 0
    entries = last.entries
    while i < len(entries):
        node = entries[i]
        if node.level == 0:  # a run of tokens: one span
            j = i
            while j + 1 < len(entries) and entries[j + 1].level == 0:
                j += 1
            text = tokenizer.decode(tokens[node.start : entries[j].end].tolist())
            spans.append(f'<span class="l0" title="LOD0 tokens {node.start:,}–{entries[j].end:,}">{html.escape(text)}</span>')
            i = j + 1
            continue
        text = tokenizer.decode(tokens[node.start : node.end].tolist())
        preview = html.escape(text[:GIST_PREVIEW].replace("\n", " ")) + ("…" if len(text) > GIST_PREVIEW else "")
        score = f", LensNet {scores[node]:+.3f}" if node in scores else ""
        spans.append(f'<span class="l{node.level}" data-level="{node.level}" '
                     f'title="LOD{node.level} gist of tokens {node.start:,}–{node.end:,}{score}">[{preview}]</span>')
        i += 1
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
.doc {{ font-family: monospace; white-space: pre-wrap; font-size: 0.8em; line-height: 1.5; }}
.l0 {{ background: {LOD_COLOURS[0]}22; }}
.l1 {{ background: {LOD_COLOURS[1]}; color: #222; font-size: 0.85em; }}
.l2 {{ background: {LOD_COLOURS[2]}; color: #fff; font-size: 0.85em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><img src="{html.escape(picture)}" alt="LOD map over time" style="max-width: 100%"></p>
<h2>Refocus snapshots</h2>
<table id="snapshots"><tr><th>cursor</th><th>entries</th><th>LOD0</th><th>LOD1</th><th>LOD2</th><th>expands</th>
<th>collapses</th><th>mean score</th></tr>
{chr(10).join(rows)}
</table>
<h2>What the base model reads at t={last.cursor:,}</h2>
<p>Blue: tokens (LOD0). Orange: LOD1 gists (32 tokens each). Red: LOD2 gists (1,024 tokens). Hover for spans and scores.</p>
<div class="doc">{''.join(spans)}</div>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def write_snapshots_json(snapshots: Sequence[Snapshot], path: Path) -> Path:
    """Machine-readable snapshots: entries as (level, start), scores, edits."""
    data = [{"cursor": s.cursor, "entries": [[n.level, n.start] for n in s.entries],
             "scored": [[n.level, n.start] for n in s.scored], "scores": [round(float(x), 5) for x in s.scores],
             "edits": [{"action": e.action, "level": e.node.level, "start": e.node.start, "score": round(e.score, 5)}
                       for e in s.edits]} for s in snapshots]
    path.write_text(json.dumps(data) + "\n")
    return path
