"""Reading the files of an embedding directory without trusting them.

An embedding directory (``simsiam-kit embed --output DIR``) may come from anywhere, so nothing in it
decides how much memory is allocated or which code runs before it has been checked against the file's
own length and against the other files of the directory:

* Every file is opened with :func:`simsiam_kit.utils.io.open_regular`: a link to ``/dev/zero``, a FIFO
  or a device is refused before a byte is read.
* :func:`read_json`: UTF-8 JSON of the expected top-level type, at most :data:`MAX_JSON_BYTES`; a syntax
  error, binary bytes or nesting deeper than Python's recursion limit is one :class:`UserError` naming
  the file.
* :func:`load_npy`: the ``.npy`` header is read first (magic, version, dtype, shape); an object dtype
  (a pickle inside the array) is refused, and the declared shape times the item size must be exactly
  the bytes that follow the header; only then is the array read (``allow_pickle=False``).
* :func:`check_faiss_file`: the FAISS index file is parsed before faiss reads it. ``faiss.read_index``
  allocates every vector at the size the file declares (up to 1 TB by default) before it reads the
  vector's bytes, so a few changed bytes in a 43 KB file asked for 15.7 GB. The parser walks the
  layout faiss writes for the three kinds simsiam-kit builds (``IndexFlatIP``, ``IndexIVFFlat`` over an
  ``IndexFlatIP`` quantizer with array inverted lists, ``IndexHNSWFlat`` over an ``IndexFlatIP``), checks
  every declared count against the bytes left in the file and against ``index.json`` (dimension,
  number of vectors, number of lists), bounds the search-time sizes stored in the file (``nprobe`` <=
  ``nlist``, HNSW ``efSearch``/``efConstruction`` <= :data:`MAX_EF`), checks that every id and graph
  link points at a stored vector, and that nothing is left over. Any other file is refused: faiss is
  only called on a file whose every allocation is bounded by its length.

Layout reference: ``faiss/impl/index_write.cpp`` (``write_index_header``, ``WRITEXBVECTOR``,
``write_ivf_header``, ``write_direct_map``, ``write_InvertedLists``, ``write_HNSW``), unchanged from
faiss 1.8 to 1.15 for these three kinds; ``tests/reliability/test_untrusted_files.py`` round-trips each kind through
the installed faiss.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import open_regular, read_bytes_bounded

#: faiss's own bound on the dimension (``read_index_header``).
MAX_DIM = 1 << 20
#: HNSW ``efSearch`` / ``efConstruction`` read from a file: each search allocates heaps of this size.
MAX_EF = 1 << 16
NPY_MAX_HEADER = 10_000  # numpy's default for np.load
#: the largest JSON file of an embedding directory read (``ids.json`` of tens of millions of ids fits)
MAX_JSON_BYTES = 1 << 30


def read_json(path: Path, expect: type, what: Optional[str] = None):
    """The JSON value in ``path``, which must be an instance of ``expect`` (dict or list)."""
    p = Path(path)
    try:
        value = json.loads(read_bytes_bounded(p, MAX_JSON_BYTES, what or "").decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: missing{f' ({what})' if what else ''}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte at offset {e.start}); expected JSON") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{p}: invalid JSON value ({str(e)[:200]})") from None
    if not isinstance(value, expect):
        raise UserError(f"{p}: expected a JSON {'object' if expect is dict else 'array'}, got {type(value).__name__}")
    return value


def npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """``(shape, dtype, data_offset)`` of a ``.npy`` file, checked against its length (see module doc)."""
    p = Path(path)
    fmt = np.lib.format
    try:
        with open_regular(p) as f:
            size = f.seek(0, 2)
            f.seek(0)
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except FileNotFoundError:
        raise UserError(f"{p}: missing") from None
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{p}: not a valid .npy file ({msg})") from None
    if dtype.hasobject:
        raise UserError(f"{p}: holds Python objects (dtype {dtype}), which only a pickle can load; refused")
    count = 1
    for n in shape:
        count *= int(n)
    need = count * dtype.itemsize
    if need != size - offset:
        raise UserError(
            f"{p}: header declares shape {tuple(shape)} of {dtype} ({need} bytes) but the file holds "
            f"{size - offset} bytes of data"
        )
    return tuple(int(n) for n in shape), dtype, offset


def load_npy(path: Path, kinds: str, ndim: int, shape: Optional[tuple] = None) -> np.ndarray:
    """A ``.npy`` array checked before it is read: numeric of a dtype kind in ``kinds`` (``"f"``, ``"iu"``),
    ``ndim`` dimensions, and ``shape`` where given (``None`` entries match anything)."""
    p = Path(path)
    got, dtype, _ = npy_header(p)
    if dtype.kind not in kinds:
        want = {"f": "floating-point", "iu": "integer"}.get(kinds, kinds)
        raise UserError(f"{p}: expected {want} values, got dtype {dtype}")
    if len(got) != ndim or (shape is not None and any(w is not None and w != g for w, g in zip(shape, got))):
        expected = tuple("*" if w is None else w for w in shape) if shape is not None else f"{ndim}-D"
        raise UserError(f"{p}: shape {got}, expected {expected}")
    try:
        with open_regular(p) as f:  # the file whose header was checked, not what the path names by now
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{p}: cannot read ({str(e)[:200]})") from None


# --------------------------------------------------------------------------------------- FAISS files
class _Corrupt(Exception):
    pass


class _Reader:
    """Little-endian fields of a file, every count checked against the bytes left before it is used."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise _Corrupt(f"{what} declares {n} bytes at offset {self.f.tell()}, but only {self.left} remain")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise _Corrupt(f"{what} declares {n} bytes at offset {self.f.tell()}, but only {self.left} remain")
        self.f.seek(n, 1)

    def field(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def fourcc(self, what: str) -> bytes:
        return self.take(4, what)

    def vector_len(self, itemsize: int, what: str) -> int:
        """A faiss ``WRITEVECTOR``: a uint64 count, then count x itemsize bytes (not consumed here)."""
        n = self.field("Q", f"{what} size")
        if n * itemsize > self.left:
            raise _Corrupt(
                f"{what} declares {n} elements ({n * itemsize} bytes) at offset {self.f.tell()}, "
                f"but only {self.left} bytes remain"
            )
        return n

    def array(self, dtype: str, n: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt)


def _header(r: _Reader, what: str, dim: int, ntotal: Optional[int]) -> int:
    """faiss ``write_index_header``: d, ntotal, two dummies, is_trained, metric; returns ntotal."""
    d = r.field("i", f"{what} dimension")
    n = r.field("q", f"{what} ntotal")
    r.skip(16, f"{what} header")
    trained = r.field("B", f"{what} is_trained")
    metric = r.field("i", f"{what} metric")
    if d != dim:
        raise _Corrupt(f"{what} has dimension {d}, index.json says {dim}")
    if ntotal is not None and n != ntotal:
        raise _Corrupt(f"{what} holds {n} vectors, index.json says {ntotal}")
    if n < 0 or trained != 1 or metric != 0:  # METRIC_INNER_PRODUCT = 0
        raise _Corrupt(
            f"{what} header (ntotal {n}, is_trained {trained}, metric {metric}) is not a trained inner-product index's"
        )
    return n


def _flat(r: _Reader, what: str, dim: int, ntotal: Optional[int]) -> int:
    """``IndexFlatIP``: header, then ``WRITEXBVECTOR`` (count of floats, the floats)."""
    if r.fourcc(f"{what} type") != b"IxFI":
        raise _Corrupt(f"{what} is not an IndexFlatIP")
    n = _header(r, what, dim, ntotal)
    floats = r.vector_len(4, f"{what} vectors")
    if floats != n * dim:
        raise _Corrupt(f"{what} stores {floats} floats, not {n} x {dim}")
    r.skip(4 * floats, f"{what} vectors")
    return n


def _ivf(r: _Reader, dim: int, ntotal: int, nlist: int) -> None:
    """``IndexIVFFlat``: ivf header (index header, nlist, nprobe, quantizer, direct map), array inverted lists."""
    _header(r, "IVF index", dim, ntotal)
    n_lists = r.field("Q", "IVF nlist")
    nprobe = r.field("Q", "IVF nprobe")
    if n_lists != nlist or n_lists < 1:
        raise _Corrupt(f"IVF index has {n_lists} lists, index.json says {nlist}")
    if not 1 <= nprobe <= n_lists:
        raise _Corrupt(f"IVF nprobe {nprobe} is not in [1, nlist={n_lists}]")
    _flat(r, "IVF quantizer", dim, n_lists)  # the centroids: n_lists x dim floats in the file bound n_lists
    if r.field("B", "IVF direct map type") != 0 or r.vector_len(8, "IVF direct map") != 0:
        raise _Corrupt("IVF index has a direct map (simsiam-kit never builds one)")
    if r.fourcc("IVF inverted lists type") != b"ilar":
        raise _Corrupt("IVF inverted lists are not array lists")
    if r.field("Q", "IVF inverted lists nlist") != n_lists:
        raise _Corrupt("IVF inverted lists disagree with the index on nlist")
    if r.field("Q", "IVF code size") != 4 * dim:
        raise _Corrupt(f"IVF code size is not 4 x {dim}")
    kind = r.fourcc("IVF list sizes type")
    sizes = np.zeros(n_lists, dtype=np.uint64)
    if kind == b"full":
        sizes = r.array("<u8", r.vector_len(8, "IVF list sizes"), "IVF list sizes")
        if len(sizes) != n_lists:
            raise _Corrupt(f"IVF list sizes has {len(sizes)} entries for {n_lists} lists")
    elif kind == b"sprs":
        pairs = r.array("<u8", r.vector_len(8, "IVF list sizes"), "IVF list sizes")
        if len(pairs) % 2 or (len(pairs) and pairs[0::2].max() >= n_lists):
            raise _Corrupt("IVF sparse list sizes are malformed")
        sizes[pairs[0::2]] = pairs[1::2]
    else:
        raise _Corrupt(f"IVF list sizes type {kind!r} unknown")
    if len(sizes) and sizes.max() > ntotal or int(sizes.sum(dtype=np.uint64)) != ntotal:
        raise _Corrupt(f"IVF lists hold {int(sizes.sum(dtype=np.uint64))} entries, not {ntotal}")
    for i in np.flatnonzero(sizes):
        n = int(sizes[i])
        r.skip(n * 4 * dim, f"IVF list {i} codes")
        ids = r.array("<i8", n, f"IVF list {i} ids")
        if ids.min() < 0 or ids.max() >= ntotal:
            raise _Corrupt(f"IVF list {i} holds ids outside [0, {ntotal})")


def _hnsw(r: _Reader, dim: int, ntotal: int) -> None:
    """``IndexHNSWFlat``: header, the graph (``write_HNSW``), then its ``IndexFlatIP`` storage."""
    _header(r, "HNSW index", dim, ntotal)
    r.skip(8 * r.vector_len(8, "HNSW assign_probas"), "HNSW assign_probas")
    what = "HNSW cum_nneighbor_per_level"
    cum = r.array("<i4", r.vector_len(4, what), what).astype(np.int64)
    levels = r.array("<i4", r.vector_len(4, "HNSW levels"), "HNSW levels").astype(np.int64)
    offsets = r.array("<u8", r.vector_len(8, "HNSW offsets"), "HNSW offsets")
    neighbors = r.array("<i4", r.vector_len(4, "HNSW neighbors"), "HNSW neighbors")
    entry, max_level, ef_construction, ef_search, _ = (
        r.field("i", f"HNSW {w}") for w in ("entry_point", "max_level", "efConstruction", "efSearch", "upper_beam")
    )
    if len(levels) != ntotal or len(offsets) != ntotal + 1:
        raise _Corrupt(f"HNSW graph has {len(levels)} levels and {len(offsets)} offsets for {ntotal} vectors")
    if len(cum) == 0 or cum[0] != 0 or (np.diff(cum) < 0).any():
        raise _Corrupt("HNSW cum_nneighbor_per_level is not a non-decreasing list from 0")
    if ntotal and (levels.min() < 1 or levels.max() >= len(cum)):
        raise _Corrupt(f"HNSW levels outside [1, {len(cum)})")
    expect = np.concatenate([[0], np.cumsum(cum[levels])]).astype(np.int64)
    if not np.array_equal(offsets.astype(np.int64), expect) or int(offsets[-1]) > len(neighbors):
        raise _Corrupt("HNSW offsets do not match the levels and neighbour counts")
    if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= ntotal):
        raise _Corrupt(f"HNSW links point outside [0, {ntotal})")
    if not -1 <= entry < ntotal or not -1 <= max_level < len(cum):
        raise _Corrupt(f"HNSW entry point {entry} / max level {max_level} out of range")
    if not (1 <= ef_search <= MAX_EF and 1 <= ef_construction <= MAX_EF):
        raise _Corrupt(f"HNSW efSearch {ef_search} / efConstruction {ef_construction} outside [1, {MAX_EF}]")
    if r.fourcc("HNSW storage type") != b"IxFI":
        raise _Corrupt("HNSW storage is not an IndexFlatIP")
    n = _header(r, "HNSW storage", dim, ntotal)
    floats = r.vector_len(4, "HNSW storage vectors")
    if floats != n * dim:
        raise _Corrupt(f"HNSW storage stores {floats} floats, not {n} x {dim}")
    r.skip(4 * floats, "HNSW storage vectors")


def check_faiss_file(path: Path, kind: str, dim: int, ntotal: int, nlist: int) -> None:
    """Raise :class:`UserError` naming ``path`` unless it is a FAISS index of ``kind`` ("flat", "ivf",
    "hnsw") that simsiam-kit writes, with ``dim``, ``ntotal`` (and ``nlist`` lists for "ivf") as
    ``index.json`` records them, every declared size within the file (see the module docstring)."""
    p = Path(path)
    expect = {"flat": b"IxFI", "ivf": b"IwFl", "hnsw": b"IHNf"}[kind]
    try:
        with open_regular(p) as f:
            r = _Reader(f, f.seek(0, 2))
            f.seek(0)
            got = r.fourcc("index type")
            if got != expect:
                raise _Corrupt(f"index type {got!r} is not the {kind} index ({expect!r}) index.json records")
            if kind == "flat":
                r.f.seek(0)
                _flat(r, "flat index", dim, ntotal)
            elif kind == "ivf":
                _ivf(r, dim, ntotal, nlist)
            else:
                _hnsw(r, dim, ntotal)
            if r.left:
                raise _Corrupt(f"{r.left} unexpected bytes after the index")
    except FileNotFoundError:
        raise UserError(f"{p}: missing") from None
    except _Corrupt as e:
        raise UserError(f"{p}: corrupt or foreign FAISS index ({e}); rebuild it with `simsiam-kit embed`") from None
