"""The indexed images of an embedding directory, for the code that shows them: search pictures
(:mod:`simsiam_kit.retrieval.pictures`) and the HTTP service (:mod:`simsiam_kit.serve`).

This module is the one place that knows how an embedding directory maps an index row back to its image
and to the facts shown next to it (id, label, class, index kind, measured recall); everything else asks
a :class:`Gallery`::

    g = Gallery.open("emb/")
    g.count, g.dim, g.info()          # rows, width, {"kind", "backend", "exact", "recall"}
    g.item(3)                          # {"row": 3, "id": ..., "label": ..., "class": ...}
    g.image(3)                         # the row's image (PIL, RGB), read from the embedded dataset
    sims, rows = g.search(vectors, k)  # the index's search, serialised for threads

The directory is read through :func:`simsiam_kit.retrieval.embed_search.load_embeddings_dir` (which
checks every file). A row's image comes from the dataset recorded in the manifest (``data``): for an
ImageFolder the file ``root / id``, which must lie inside the root (an ``ids.json`` from elsewhere
cannot point outside it); for an array dataset (``.npz``, ``demo``, torchvision) the dataset is loaded
once and the id is its row. Nothing a caller passes but a row number ever chooses a file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np

from simsiam_kit.data.datasets import to_rgb
from simsiam_kit.errors import UserError

#: index kinds whose search is exact (the others are approximate; their recall is measured, not guaranteed)
EXACT_KINDS = ("flat",)
#: the largest image (width x height) a gallery or an upload may decode; a bigger one is refused from its header
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLarge(UserError):
    """An image whose header declares more pixels than allowed (refused before decoding)."""


def open_image(src, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "image"):
    """An RGB PIL image from a path or a binary file object, its size checked against ``max_pixels`` from
    the header before any pixel is decoded (a decompression bomb is refused, not decoded); a file that
    is not an image, or is truncated, is a :class:`UserError` naming ``what``."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise UserError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
        raise ImageTooLarge(f"{what} declares more than {max_pixels:,} pixels; refused before decoding") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLarge(
                f"{what} is {w} x {h} pixels, more than the {max_pixels:,} allowed; refused before decoding"
            )
        try:
            im.load()
            return to_rgb(im)  # the one decoding rule (16-bit grayscale scaled, not clipped)
        except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError, ...
            raise UserError(f"{what} cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None


def index_recall(manifest: dict, index_json: Optional[dict] = None) -> Optional[float]:
    """The measured recall of an approximate index, where the directory records one (the manifest's
    ``index`` entry or ``index.json``, as ``recall`` or ``measured_recall``), else None."""
    for src in (manifest.get("index"), index_json):
        if isinstance(src, dict):
            for key in ("recall", "measured_recall"):
                v = src.get(key)
                if isinstance(v, dict):  # e.g. {"recall_at_10": 0.97, ...}: the first number
                    v = next((x for x in v.values() if isinstance(x, (int, float))), None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v)
    return None


class Gallery:
    """An embedding directory opened once: index, ids, labels, classes, and the images of its rows."""

    def __init__(self, store: dict):
        self.dir: Path = store["dir"]
        self.manifest: dict = store["manifest"]
        self.ids: list = store["ids"]
        self.labels: Optional[np.ndarray] = store["labels"]
        self.index = store["index"]
        classes = self.manifest.get("classes")
        self.classes: Optional[list] = classes if isinstance(classes, list) else None
        self.data: Optional[str] = self.manifest.get("data") if isinstance(self.manifest.get("data"), str) else None
        self._lock = threading.Lock()
        self._source: Any = None  # lazily: ("folder", root) or ("arrays", dataset, {id: position})
        self._source_error: Optional[str] = None

    @classmethod
    def open(cls, index_dir) -> "Gallery":
        from simsiam_kit.retrieval.embed_search import load_embeddings_dir

        return cls(load_embeddings_dir(index_dir))

    # ------------------------------------------------------------------ facts
    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    @property
    def model(self) -> Optional[Path]:
        m = self.manifest.get("model")
        return Path(m) if isinstance(m, str) and m else None

    def info(self) -> dict:
        """The index as a response reports it: kind, backend, whether the search is exact, and the
        measured recall of an approximate kind when the directory records one."""
        from simsiam_kit.retrieval.files import read_json

        index_json = None
        if (self.dir / "index.json").is_file():
            try:
                index_json = read_json(self.dir / "index.json", dict)
            except UserError:
                index_json = None
        exact = self.index.kind in EXACT_KINDS
        return {
            "kind": self.index.kind,
            "backend": self.index.backend,
            "exact": exact,
            "recall": None if exact else index_recall(self.manifest, index_json),
            "count": self.count,
            "dim": self.dim,
        }

    def item(self, row: int) -> dict:
        """Row ``row``'s id, and its label and class name when the directory has labels."""
        self.check_row(row)
        out = {"row": int(row), "id": self.ids[row]}
        if self.labels is not None:
            lab = int(self.labels[row])
            out["label"] = lab
            if self.classes and 0 <= lab < len(self.classes):
                out["class"] = self.classes[lab]
        return out

    def check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= int(row) < self.count:
            raise UserError(f"row {row} is not in the index (rows 0..{self.count - 1})")
        return int(row)

    # ------------------------------------------------------------------ search
    def search(self, vectors: np.ndarray, k: int):
        """``(similarities, rows)``, each (Q, min(k, count)); -1 rows (an approximate index that found
        fewer) are kept for the caller to drop. Serialised: one search at a time."""
        k = min(int(k), self.count)
        with self._lock:
            return self.index.search(np.asarray(vectors, np.float32), k)

    def neighbours(self, sims_row, rows_row) -> list[dict]:
        """One query's neighbours as dicts: rank, row, id, score, label, class (rows < 0 dropped)."""
        out = []
        for rank, (s, r) in enumerate(zip(np.asarray(sims_row).tolist(), np.asarray(rows_row).tolist()), 1):
            if r < 0:
                continue
            out.append({"rank": rank, **self.item(int(r)), "score": round(float(s), 6)})
        return out

    # ------------------------------------------------------------------ images
    def _open_source(self):
        from simsiam_kit.data.datasets import check_spec, load_dataset

        if self.data is None:
            raise UserError(f"{self.dir}: the manifest records no dataset, so the images cannot be shown")
        kind, path = check_spec(self.data)
        if kind == "folder" and path is not None:
            return ("folder", Path(os.path.abspath(path)))
        ds = load_dataset(self.data)
        return ("arrays", ds, {i: p for p, i in enumerate(ds.ids)})

    def image(self, row: int, max_pixels: int = MAX_IMAGE_PIXELS):
        """Row ``row``'s image (RGB PIL) from the embedded dataset; a :class:`UserError` when the dataset
        is gone or the file is not readable. Only the row chooses the image."""
        row = self.check_row(row)
        with self._lock:
            if self._source is None and self._source_error is None:
                try:
                    self._source = self._open_source()
                except UserError as e:
                    self._source_error = str(e)
            if self._source_error is not None:
                raise UserError(f"the images of {self.dir} are not available: {self._source_error}")
            source = self._source
        ident = self.ids[row]
        if source[0] == "folder":
            root = source[1]
            # normalised, not resolved: ".." and absolute ids cannot leave the root, while the dataset's own
            # symlinked files (placed there by its owner, read by `embed`) still show
            path = Path(os.path.normpath(root / str(ident)))
            if not path.is_relative_to(root) or path == root or not path.is_file():
                raise UserError(f"row {row}: image '{ident}' is not a file under {root}")
            return open_image(path, max_pixels, f"image of row {row} ({ident})")
        _, ds, pos = source
        p = pos.get(ident)
        if p is None:
            raise UserError(f"row {row}: id {ident!r} is not in the dataset {self.data}")
        img = ds.load_pil(p)
        if img is None:
            raise UserError(f"row {row}: image {ident!r} cannot be read")
        return img.convert("RGB")

    def thumbnail(self, row: int, size: int = 128) -> bytes:
        """Row ``row``'s image as a PNG no larger than ``size`` x ``size`` (aspect kept)."""
        import io

        from PIL import Image

        img = self.image(row)
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
