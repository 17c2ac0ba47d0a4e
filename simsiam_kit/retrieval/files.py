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
  layout faiss writes for the kinds simsiam-kit builds (``IndexFlatIP``, ``IndexIVFFlat``,
  ``IndexIVFScalarQuantizer`` and ``IndexIVFPQ`` over an ``IndexFlatIP`` quantizer, an OPQ
  ``IndexPreTransform`` around an ``IndexIVFPQ``, ``IndexHNSWFlat`` over an ``IndexFlatIP``; inverted
  lists in the file or on disk in ``index.ivfdata``, whose every list must lie inside that file and hold
  ids of stored vectors), checks
  every declared count against the bytes left in the file and against ``index.json`` (dimension,
  number of vectors, number of lists), bounds the search-time sizes stored in the file (``nprobe`` <=
  ``nlist``, HNSW ``efSearch``/``efConstruction`` <= :data:`MAX_EF`), checks that every id and graph
  link points at a stored vector, and that nothing is left over. Any other file is refused: faiss is
  only called on a file whose every allocation is bounded by its length.

Layout reference: ``faiss/impl/index_write.cpp`` (``write_index_header``, ``WRITEXBVECTOR``,
``write_ivf_header``, ``write_direct_map``, ``write_InvertedLists``, ``write_HNSW``,
``write_ProductQuantizer``, ``write_ScalarQuantizer``, ``write_VectorTransform``;
``OnDiskInvertedListsIOHook::write``), unchanged from
faiss 1.8 to 1.15 for flat, IVF-Flat and HNSW (IVF-SQ, IVF-PQ, OPQ and on-disk lists checked against 1.15);
``tests/reliability/test_untrusted_files.py`` and ``tests/retrieval/test_index_build.py`` round-trip each
kind through the installed faiss.
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
#: the kinds with inverted lists (``nprobe`` at search time; lists in the file or in ``index.ivfdata``)
IVF_KINDS = ("ivf", "ivfsq", "ivfpq", "opq_ivfpq")
#: the type code each kind's FAISS file starts with
KIND_FOURCC = {
    "flat": b"IxFI",
    "ivf": b"IwFl",
    "hnsw": b"IHNf",
    "ivfsq": b"IwSq",
    "ivfpq": b"IwPQ",
    "opq_ivfpq": b"IxPT",
}
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


def _flat(r: _Reader, what: str, dim: int, ntotal: Optional[int], type_read: bool = False) -> int:
    """``IndexFlatIP``: header, then ``WRITEXBVECTOR`` (count of floats, the floats). ``type_read``: the
    caller has read the type code already."""
    if not type_read and r.fourcc(f"{what} type") != b"IxFI":
        raise _Corrupt(f"{what} is not an IndexFlatIP")
    n = _header(r, what, dim, ntotal)
    floats = r.vector_len(4, f"{what} vectors")
    if floats != n * dim:
        raise _Corrupt(f"{what} stores {floats} floats, not {n} x {dim}")
    r.skip(4 * floats, f"{what} vectors")
    return n


def _ivf_header(r: _Reader, what: str, dim: int, ntotal: int, nlist: int) -> int:
    """faiss ``write_ivf_header``: index header, nlist, nprobe, the quantizer (an ``IndexFlatIP``, or an
    ``IndexHNSWFlat`` over the centroids from :data:`~simsiam_kit.retrieval.index_build.COARSE_HNSW_FROM`
    lists), the direct map."""
    _header(r, what, dim, ntotal)
    n_lists = r.field("Q", f"{what} nlist")
    nprobe = r.field("Q", f"{what} nprobe")
    if n_lists != nlist or n_lists < 1:
        raise _Corrupt(f"{what} has {n_lists} lists, index.json says {nlist}")
    if not 1 <= nprobe <= n_lists:
        raise _Corrupt(f"{what} nprobe {nprobe} is not in [1, nlist={n_lists}]")
    # the centroids: n_lists x dim floats in the file bound n_lists
    q = r.fourcc(f"{what} quantizer type")
    if q == b"IxFI":
        _flat(r, f"{what} quantizer", dim, n_lists, type_read=True)
    elif q == b"IHNf":
        _hnsw(r, dim, n_lists, f"{what} HNSW quantizer")
    else:
        raise _Corrupt(f"{what} quantizer type {q!r} is neither an IndexFlatIP nor an IndexHNSWFlat")
    if r.field("B", f"{what} direct map type") != 0 or r.vector_len(8, f"{what} direct map") != 0:
        raise _Corrupt(f"{what} has a direct map (simsiam-kit never builds one)")
    return n_lists


def _ivf(r: _Reader, dim: int, ntotal: int, nlist: int, ivfdata: Optional[Path] = None) -> None:
    """``IndexIVFFlat``: ivf header, then inverted lists of 4 x dim byte codes."""
    n_lists = _ivf_header(r, "IVF index", dim, ntotal, nlist)
    _invlists(r, "IVF", n_lists, 4 * dim, ntotal, ivfdata)


def _ivfpq(r: _Reader, what: str, dim: int, ntotal: int, nlist: int, pq_m: int, ivfdata: Optional[Path]) -> None:
    """``IndexIVFPQ``: ivf header, by_residual, code_size, the product quantizer (d, M, nbits, centroids),
    then inverted lists of M-byte codes (8 bits per sub-quantizer: the only kind simsiam-kit builds)."""
    n_lists = _ivf_header(r, what, dim, ntotal, nlist)
    if r.field("B", f"{what} by_residual") not in (0, 1):
        raise _Corrupt(f"{what} by_residual is not a boolean")
    code_size = r.field("Q", f"{what} code size")
    d, m, nbits = (r.field("Q", f"{what} PQ {w}") for w in ("d", "M", "nbits"))
    if d != dim or m != pq_m or nbits != 8 or code_size != m:
        raise _Corrupt(
            f"{what} product quantizer (d {d}, M {m}, nbits {nbits}, code size {code_size}) is not the "
            f"{pq_m}-byte, 8-bit quantizer of dimension {dim} index.json records"
        )
    if r.vector_len(4, f"{what} PQ centroids") != 256 * dim:
        raise _Corrupt(f"{what} PQ centroids are not 256 x {dim} floats")
    r.skip(4 * 256 * dim, f"{what} PQ centroids")
    _invlists(r, what, n_lists, code_size, ntotal, ivfdata)


#: faiss ``ScalarQuantizer::QuantizerType`` of the codes simsiam-kit builds (non-uniform: a range per dimension)
SQ_QTYPE = {8: 0, 4: 1, 6: 6}


def _ivfsq(r: _Reader, dim: int, ntotal: int, nlist: int, sq_bits: int, ivfdata: Optional[Path]) -> None:
    """``IndexIVFScalarQuantizer``: ivf header, the scalar quantizer (qtype, rangestat, rangestat_arg, d,
    code_size, the trained ranges: a min and a width per dimension), code_size, by_residual, then inverted
    lists of ceil(sq_bits x d / 8)-byte codes."""
    what = "IVF-SQ index"
    n_lists = _ivf_header(r, what, dim, ntotal, nlist)
    qtype, _rangestat = r.field("i", f"{what} quantizer type"), r.field("i", f"{what} range statistic")
    r.skip(4, f"{what} range statistic argument")
    d, code_size = r.field("Q", f"{what} SQ d"), r.field("Q", f"{what} SQ code size")
    want = (dim * sq_bits + 7) // 8
    if sq_bits not in SQ_QTYPE or qtype != SQ_QTYPE[sq_bits] or d != dim or code_size != want:
        raise _Corrupt(
            f"{what} scalar quantizer (type {qtype}, d {d}, code size {code_size}) is not the {sq_bits}-bit "
            f"quantizer of dimension {dim} index.json records"
        )
    if r.vector_len(4, f"{what} SQ ranges") != 2 * dim:
        raise _Corrupt(f"{what} SQ ranges are not 2 x {dim} floats")
    r.skip(8 * dim, f"{what} SQ ranges")
    if r.field("Q", f"{what} code size") != code_size or r.field("B", f"{what} by_residual") not in (0, 1):
        raise _Corrupt(f"{what} code size or by_residual disagrees with its quantizer")
    _invlists(r, what, n_lists, code_size, ntotal, ivfdata)


def _opq_ivfpq(r: _Reader, dim: int, ntotal: int, nlist: int, pq_m: int, opq_dim: int, ivfdata: Optional[Path]) -> None:
    """``IndexPreTransform``: header, one ``LTra`` (the OPQ rotation: have_bias, A, b, d_in, d_out,
    is_trained), then the ``IndexIVFPQ`` of the rotated vectors."""
    _header(r, "OPQ index", dim, ntotal)
    if r.field("i", "OPQ chain length") != 1 or r.fourcc("OPQ transform type") != b"LTra":
        raise _Corrupt("OPQ index does not hold exactly one linear transform")
    bias = r.field("B", "OPQ have_bias")
    a = r.vector_len(4, "OPQ matrix")
    if a != opq_dim * dim:
        raise _Corrupt(f"OPQ matrix holds {a} floats, not {opq_dim} x {dim}")
    r.skip(4 * a, "OPQ matrix")
    b = r.vector_len(4, "OPQ bias")
    if b != (opq_dim if bias else 0):
        raise _Corrupt(f"OPQ bias holds {b} floats")
    r.skip(4 * b, "OPQ bias")
    d_in, d_out, trained = r.field("i", "OPQ d_in"), r.field("i", "OPQ d_out"), r.field("B", "OPQ is_trained")
    if (d_in, d_out, trained) != (dim, opq_dim, 1):
        raise _Corrupt(f"OPQ transform maps {d_in} -> {d_out} (trained {trained}), index.json says {dim} -> {opq_dim}")
    if r.fourcc("OPQ inner index type") != b"IwPQ":
        raise _Corrupt("OPQ inner index is not an IndexIVFPQ")
    _ivfpq(r, "OPQ IVF-PQ index", opq_dim, ntotal, nlist, pq_m, ivfdata)


def _invlists(r: _Reader, what: str, n_lists: int, code_size: int, ntotal: int, ivfdata: Optional[Path]) -> None:
    """Array inverted lists (``ilar``: sizes, then each list's codes and ids in the file), or on-disk ones
    (``ilod``: each list's size, capacity and offset in ``ivfdata``, whose length must cover them all)."""
    kind = r.fourcc(f"{what} inverted lists type")
    if kind == b"ilod":
        _ondisk_lists(r, what, n_lists, code_size, ntotal, ivfdata)
        return
    if kind != b"ilar":
        raise _Corrupt(f"{what} inverted lists are not array lists")
    if ivfdata is not None:
        raise _Corrupt(f"{what} inverted lists are in the file, index.json says on disk")
    if r.field("Q", f"{what} inverted lists nlist") != n_lists:
        raise _Corrupt(f"{what} inverted lists disagree with the index on nlist")
    if r.field("Q", f"{what} code size") != code_size:
        raise _Corrupt(f"{what} code size is not {code_size}")
    kind = r.fourcc(f"{what} list sizes type")
    sizes = np.zeros(n_lists, dtype=np.uint64)
    if kind == b"full":
        sizes = r.array("<u8", r.vector_len(8, f"{what} list sizes"), f"{what} list sizes")
        if len(sizes) != n_lists:
            raise _Corrupt(f"{what} list sizes has {len(sizes)} entries for {n_lists} lists")
    elif kind == b"sprs":
        pairs = r.array("<u8", r.vector_len(8, f"{what} list sizes"), f"{what} list sizes")
        if len(pairs) % 2 or (len(pairs) and pairs[0::2].max() >= n_lists):
            raise _Corrupt(f"{what} sparse list sizes are malformed")
        sizes[pairs[0::2]] = pairs[1::2]
    else:
        raise _Corrupt(f"{what} list sizes type {kind!r} unknown")
    if len(sizes) and sizes.max() > ntotal or int(sizes.sum(dtype=np.uint64)) != ntotal:
        raise _Corrupt(f"{what} lists hold {int(sizes.sum(dtype=np.uint64))} entries, not {ntotal}")
    for i in np.flatnonzero(sizes):
        n = int(sizes[i])
        r.skip(n * code_size, f"{what} list {i} codes")
        ids = r.array("<i8", n, f"{what} list {i} ids")
        if ids.min() < 0 or ids.max() >= ntotal:
            raise _Corrupt(f"{what} list {i} holds ids outside [0, {ntotal})")


def _ondisk_lists(r: _Reader, what: str, n_lists: int, code_size: int, ntotal: int, ivfdata: Optional[Path]) -> None:
    """``OnDiskInvertedLists``: nlist, code_size, lists (size, capacity, offset), free slots (offset,
    capacity), the data file's name, its total size. faiss maps ``totsize`` bytes of the data file and
    reads each list where its offset says: every list must lie inside the file, which must be that long,
    and every id in it must point at a stored vector."""
    if ivfdata is None:
        raise _Corrupt(f"{what} inverted lists are on disk, index.json says they are not")
    if r.field("Q", f"{what} on-disk nlist") != n_lists or r.field("Q", f"{what} on-disk code size") != code_size:
        raise _Corrupt(f"{what} on-disk lists disagree with the index on nlist or code size")
    count = r.vector_len(24, f"{what} on-disk lists")
    if count != n_lists:
        raise _Corrupt(f"{what} on-disk lists has {count} entries for {n_lists} lists")
    lists = r.array("<u8", 3 * count, f"{what} on-disk lists").reshape(count, 3).astype(np.uint64)
    r.skip(16 * r.vector_len(16, f"{what} on-disk free slots"), f"{what} on-disk free slots")
    name = r.take(r.vector_len(1, f"{what} on-disk file name"), f"{what} on-disk file name")
    totsize = r.field("Q", f"{what} on-disk total size")
    if name.decode("utf-8", "replace").rsplit("/", 1)[-1] != ivfdata.name:
        raise _Corrupt(f"{what} lists live in {name[:80]!r}, not in {ivfdata.name}")
    try:
        size = ivfdata.stat().st_size if not ivfdata.is_symlink() else -1
    except FileNotFoundError:
        raise _Corrupt(f"its lists' file {ivfdata} is missing") from None
    if size != totsize:
        raise _Corrupt(f"{ivfdata.name} holds {size} bytes, the index says {totsize}")
    sizes, caps, offs = lists[:, 0], lists[:, 1], lists[:, 2]
    per = np.uint64(code_size + 8)
    if (sizes > caps).any() or (caps > np.uint64(totsize)).any() or (offs > np.uint64(totsize)).any():
        raise _Corrupt(f"{what} on-disk lists declare sizes or offsets beyond {ivfdata.name}")
    if ((offs + caps * per) > np.uint64(totsize)).any():
        raise _Corrupt(f"{what} on-disk lists reach past the end of {ivfdata.name}")
    if int(sizes.sum(dtype=np.uint64)) != ntotal:
        raise _Corrupt(f"{what} on-disk lists hold {int(sizes.sum(dtype=np.uint64))} entries, not {ntotal}")
    if ntotal:
        data = np.memmap(ivfdata, dtype=np.uint8, mode="r", shape=(totsize,))
        for i in np.flatnonzero(sizes):
            start = int(offs[i] + caps[i] * np.uint64(code_size))
            ids = data[start : start + 8 * int(sizes[i])].view("<i8")
            if ids.min() < 0 or ids.max() >= ntotal:
                raise _Corrupt(f"{what} on-disk list {i} holds ids outside [0, {ntotal})")
        del data


def _hnsw(r: _Reader, dim: int, ntotal: int, name: str = "HNSW index") -> None:
    """``IndexHNSWFlat`` (the type code read): header, the graph (``write_HNSW``), then its ``IndexFlatIP``
    storage. ``name``: what the messages call it (the index, or an IVF index's quantizer)."""
    p = "" if name == "HNSW index" else f"{name}: "  # the quantizer of an IVF index says so
    _header(r, name, dim, ntotal)
    r.skip(8 * r.vector_len(8, f"{p}HNSW assign_probas"), f"{p}HNSW assign_probas")
    what = f"{p}HNSW cum_nneighbor_per_level"
    cum = r.array("<i4", r.vector_len(4, what), what).astype(np.int64)
    levels = r.array("<i4", r.vector_len(4, f"{p}HNSW levels"), f"{p}HNSW levels").astype(np.int64)
    offsets = r.array("<u8", r.vector_len(8, f"{p}HNSW offsets"), f"{p}HNSW offsets")
    neighbors = r.array("<i4", r.vector_len(4, f"{p}HNSW neighbors"), f"{p}HNSW neighbors")
    entry, max_level, ef_construction, ef_search, _ = (
        r.field("i", f"{p}HNSW {w}") for w in ("entry_point", "max_level", "efConstruction", "efSearch", "upper_beam")
    )
    if len(levels) != ntotal or len(offsets) != ntotal + 1:
        raise _Corrupt(f"{p}HNSW graph has {len(levels)} levels and {len(offsets)} offsets for {ntotal} vectors")
    if len(cum) == 0 or cum[0] != 0 or (np.diff(cum) < 0).any():
        raise _Corrupt(f"{p}HNSW cum_nneighbor_per_level is not a non-decreasing list from 0")
    if ntotal and (levels.min() < 1 or levels.max() >= len(cum)):
        raise _Corrupt(f"{p}HNSW levels outside [1, {len(cum)})")
    expect = np.concatenate([[0], np.cumsum(cum[levels])]).astype(np.int64)
    if not np.array_equal(offsets.astype(np.int64), expect) or int(offsets[-1]) > len(neighbors):
        raise _Corrupt(f"{p}HNSW offsets do not match the levels and neighbour counts")
    if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= ntotal):
        raise _Corrupt(f"{p}HNSW links point outside [0, {ntotal})")
    if not -1 <= entry < ntotal or not -1 <= max_level < len(cum):
        raise _Corrupt(f"{p}HNSW entry point {entry} / max level {max_level} out of range")
    if not (1 <= ef_search <= MAX_EF and 1 <= ef_construction <= MAX_EF):
        raise _Corrupt(f"{p}HNSW efSearch {ef_search} / efConstruction {ef_construction} outside [1, {MAX_EF}]")
    if r.fourcc(f"{p}HNSW storage type") != b"IxFI":
        raise _Corrupt(f"{p}HNSW storage is not an IndexFlatIP")
    n = _header(r, f"{p}HNSW storage", dim, ntotal)
    floats = r.vector_len(4, f"{p}HNSW storage vectors")
    if floats != n * dim:
        raise _Corrupt(f"{p}HNSW storage stores {floats} floats, not {n} x {dim}")
    r.skip(4 * floats, f"{p}HNSW storage vectors")


def check_faiss_file(
    path: Path,
    kind: str,
    dim: int,
    ntotal: int,
    nlist: int,
    pq_m: int = 0,
    opq_dim: int = 0,
    ivfdata: Optional[Path] = None,
    sq_bits: int = 0,
) -> None:
    """Raise :class:`UserError` naming ``path`` unless it is a FAISS index of ``kind`` ("flat", "ivf",
    "hnsw", "ivfsq", "ivfpq", "opq_ivfpq") that simsiam-kit writes, with ``dim``, ``ntotal`` (and ``nlist``
    lists, ``pq_m`` code bytes, ``opq_dim`` rotated dimensions, ``sq_bits`` bits per dimension where they apply)
    as ``index.json`` records them,
    every declared size within the file (see the module docstring). ``ivfdata``: the file of on-disk
    inverted lists (``index.ivfdata``) when ``index.json`` says the lists are on disk."""
    p = Path(path)
    expect = KIND_FOURCC[kind]
    try:
        with open_regular(p) as f:
            r = _Reader(f, f.seek(0, 2))
            f.seek(0)
            got = r.fourcc("index type")
            if got != expect:
                raise _Corrupt(f"index type {got!r} is not the {kind} index ({expect!r}) index.json records")
            if ivfdata is not None and kind not in IVF_KINDS:
                raise _Corrupt(f"index.json says on-disk lists, which a {kind} index does not have")
            if kind == "flat":
                r.f.seek(0)
                _flat(r, "flat index", dim, ntotal)
            elif kind == "ivf":
                _ivf(r, dim, ntotal, nlist, ivfdata)
            elif kind == "ivfsq":
                _ivfsq(r, dim, ntotal, nlist, sq_bits, ivfdata)
            elif kind == "ivfpq":
                _ivfpq(r, "IVF-PQ index", dim, ntotal, nlist, pq_m, ivfdata)
            elif kind == "opq_ivfpq":
                _opq_ivfpq(r, dim, ntotal, nlist, pq_m, opq_dim, ivfdata)
            else:
                _hnsw(r, dim, ntotal)
            if r.left:
                raise _Corrupt(f"{r.left} unexpected bytes after the index")
    except FileNotFoundError:
        raise UserError(f"{p}: missing") from None
    except _Corrupt as e:
        raise UserError(
            f"{p}: corrupt or foreign FAISS index ({e}); rebuild it from the embeddings with "
            f"`simsiam-kit index build --embeddings {p.parent}` (or embed again with `simsiam-kit embed`)"
        ) from None
