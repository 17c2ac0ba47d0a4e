"""Pictures of neighbours: a query and its k nearest images, in rank order, with score and label.

One drawing function, :func:`neighbour_grid`, serves every picture of neighbours (``eval knn --plots``'s
grid and ``simsiam-kit search``'s contact sheets): a row per query, the query first, then its neighbours
as :class:`Tile` s (an image, a caption, and an optional green/red frame for same/other class)::

    rows = [[Tile(query_img, "query: cat"), Tile(img1, "0.913\\ncat", match=True), ...], ...]
    neighbour_grid(rows, "neighbours.png")

:func:`write_search_pictures` draws a search report (:func:`simsiam_kit.retrieval.embed_search.search_images`)
next to its JSON: ``search.png``, or ``search-1.png``, ``search-2.png``, ... with :data:`QUERIES_PER_SHEET`
queries each; the neighbour images come from the directory's :class:`~simsiam_kit.retrieval.gallery.Gallery`.
matplotlib is imported lazily (Agg backend); files are written atomically.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from simsiam_kit.errors import UserError

#: height of one caption line (6 pt text and its spacing)
CAPTION_INCHES = 0.18
#: queries per contact sheet of ``search``: one PNG for up to this many, then numbered sheets
QUERIES_PER_SHEET = 16


@dataclass(frozen=True)
class Tile:
    """One picture of a grid: ``image`` (PIL image, uint8 array, or None for a blank tile), a caption, and
    ``match``: True draws a green frame (same class as the query), False a red one, None no frame."""

    image: Any
    caption: str = ""
    match: Optional[bool] = None


def neighbour_grid(rows: Sequence[Sequence[Tile]], path, tile_inches: float = 1.2, dpi: int = 110) -> Path:
    """Draw one row per query (its first tile is the query, the rest its neighbours in rank order) to the PNG
    ``path``; rows may differ in length (an approximate index may find fewer). Returns ``path``."""
    from simsiam_kit.plots import _plt
    from simsiam_kit.utils.io import atomic_write_bytes

    if not rows or not any(rows):
        raise UserError("nothing to draw: no queries")
    nr, nc = len(rows), max(len(r) for r in rows)
    lines = max((t.caption.count("\n") + 1 for r in rows for t in r), default=1)
    plt = _plt()
    row_inches = tile_inches + CAPTION_INCHES * lines + 0.1  # room for the captions above each tile
    fig, axes = plt.subplots(nr, nc, figsize=(tile_inches * nc, row_inches * nr), dpi=dpi, squeeze=False)
    for r, tiles in enumerate(rows):
        for c in range(nc):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(tiles):
                ax.axis("off")
                continue
            t = tiles[c]
            if t.image is not None:
                ax.imshow(t.image)
            if t.match is not None:
                for sp in ax.spines.values():
                    sp.set_edgecolor("tab:green" if t.match else "tab:red")
                    sp.set_linewidth(2)
            ax.set_title(t.caption, fontsize=6)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def sheet_paths(output_json, n_queries: int, per_sheet: int = QUERIES_PER_SHEET) -> list[Path]:
    """Where the pictures of a search written to ``output_json`` go: ``<stem>.png`` for one sheet,
    ``<stem>-1.png``, ``<stem>-2.png``, ... for more."""
    out = Path(output_json)
    sheets = max(1, -(-n_queries // per_sheet))
    if sheets == 1:
        return [out.with_suffix(".png")]
    return [out.with_name(f"{out.stem}-{i}.png") for i in range(1, sheets + 1)]


def _caption(n: dict) -> str:
    lab = n.get("class", n.get("label"))
    return f"#{n['rank']} {n['score']:.3f}" + (f"\n{str(lab)[:16]}" if lab is not None else "")


def write_search_pictures(
    report: dict, gallery, output_json, per_sheet: int = QUERIES_PER_SHEET, log: Optional[Callable] = None
) -> list[Path]:
    """The contact sheets of a search report (each query, then its neighbours with rank, score and
    class/label), next to ``output_json``; returns the PNG paths. A neighbour whose image cannot be read
    is a blank tile captioned as usual (the search result stands; ``log`` says why once)."""
    from simsiam_kit.retrieval.gallery import open_image

    say = log or (lambda s: None)
    results = report["results"]
    paths = sheet_paths(output_json, len(results), per_sheet)
    warned = False
    for s, path in enumerate(paths):
        rows = []
        for res in results[s * per_sheet : (s + 1) * per_sheet]:
            q = Path(res["query"])
            try:
                qimg = open_image(q, what=f"query {q}")
            except UserError as e:
                qimg, warned = None, warned or (say(f"warning: {e}") or True)
            row = [Tile(qimg, f"query: {q.name[:18]}")]
            for n in res["neighbours"]:
                try:
                    img = gallery.image(n["row"])
                except UserError as e:
                    img, warned = None, warned or (say(f"warning: {e}") or True)
                row.append(Tile(img, _caption(n)))
            rows.append(row)
        neighbour_grid(rows, path)
    return paths


def search_with_pictures(
    index_dir, query, open_embedder, k: int = 10, model=None, output=None, log=None, nprobe=None, ef=None
) -> dict:
    """:func:`~simsiam_kit.retrieval.embed_search.search_images` (``nprobe`` / ``ef``: an approximate index's
    search knobs), then its pictures next to ``output`` (default ``<index>/search.json``): the report gains
    ``pictures`` (the PNG paths)."""
    from simsiam_kit.retrieval.embed_search import search_images
    from simsiam_kit.retrieval.gallery import Gallery

    out = Path(output).expanduser() if output is not None else Path(index_dir).expanduser() / "search.json"
    report = search_images(index_dir, query, open_embedder, k=k, model=model, output=out, log=log, nprobe=nprobe, ef=ef)
    report["pictures"] = [str(p) for p in write_search_pictures(report, Gallery.open(index_dir), out, log=log)]
    return report
