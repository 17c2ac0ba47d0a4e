"""Building a FAISS index from a stream of embedding chunks in bounded memory, with its recall measured.

``simsiam-kit index build`` (and :func:`build_index`) reads the vectors as chunks of float32 (rows, dim),
never all at once, in three passes over a :class:`VectorSource` (the shards of an embedding directory,
:func:`shards_source`, or any re-iterable chunks, :func:`chunk_source`):

1. **sample**: a seeded random choice of rows, split into the training sample and the held-out query
   vectors of the recall measurement;
2. **train** the index on the sample (k-means for the IVF lists, the PQ codebooks, the OPQ rotation);
3. **add** the chunks one by one, and at the same time search the query vectors exactly against each
   chunk (a running top-k), so the ground truth costs no extra pass. An index that does not fit in
   ``max_index_memory`` (or ``on_disk=True``) is added block by block, each block written to disk, and
   the blocks merged into FAISS's on-disk inverted lists (``OnDiskInvertedLists``, the ``merge_ondisk``
   of faiss's contrib, the way autofaiss builds indexes larger than RAM): ``index.ivfdata`` next to
   ``index.faiss``, memory-mapped at search time.

**Kinds** (``kind``), all inner product over l2-normalised vectors (cosine similarity):

=============  ==============================================  =========================================
kind           FAISS index                                     bytes per vector (plus ids, lists)
=============  ==============================================  =========================================
``flat``       ``IndexFlatIP``: exact                          4 d
``hnsw``       ``IndexHNSWFlat`` (M links): ``ef`` at search   4 d + 8 M
``ivf``        ``IndexIVFFlat``: ``nprobe`` at search          4 d + 8
``ivfsq``      ``IndexIVFScalarQuantizer`` (8, 6 or 4 bits     bits x d / 8 + 8
               per dimension, ``sq_bits``)
``ivfpq``      ``IndexIVFPQ`` (m bytes, 8 bits each)           m + 8
``opq_ivfpq``  ``OPQ`` rotation, then ``IndexIVFPQ``           m + 8
=============  ==============================================  =========================================

``auto`` picks from the number of vectors n, the dimension d and ``max_index_memory`` with autofaiss's
rule (``get_optimal_index_keys_v2``), restated in :func:`choose_plan`: flat below 1,000 vectors, HNSW
below 10,000 or whenever an HNSW graph with M >= 8 fits, IVF-Flat below 1M vectors when it fits, else
OPQ + IVF-PQ with the largest code that fits (without the OPQ rotation when the code has more than d / 4
bytes, :data:`OPQ_MIN_SUBDIM`: our deviation). ``ivfsq`` (scalar-quantizer codes of 8, 6 or 4 bits per
dimension, larger than autofaiss's largest PQ code of d / 2 bytes) is built when asked for, never by ``auto``
(see :data:`SQ_BITS`). The number of lists follows autofaiss too (a power of two
near 4 sqrt(n) below 1M vectors, 16,384 below 10M, 65,536 beyond), never more than n / 39 (faiss's
minimum of points per centroid) and overridable (``nlist``).

**Many lists.** From :data:`COARSE_HNSW_FROM` (4,096) lists on, the coarse quantizer is an HNSW graph over
the centroids (``IVF65536_HNSW32``, autofaiss's choice too; its ``efSearch`` :data:`COARSE_EF_SEARCH` at search
time, never below ``nprobe``, and :data:`COARSE_EF_ADD` while the vectors are added, above the 16 autofaiss adds
with, which caps the recall) and
the centroids come from faiss's two-level k-means (``two_level_clustering``, restated in
:func:`two_level_centroids` with guards against empty clusters: sqrt(nlist) clusters, then
each split in proportion to its size, spherical), with no floor of 39 points per list: a flat quantizer costs
nlist x d per vector added and per k-means point and iteration, which at 65,536 lists
and 10M vectors is hours on a few cores, the HNSW graph about log(nlist) x M x d.

**Recall.** ``queries`` held-out vectors (at most a tenth of the rows of the input, chosen with the
sample and not used to train) are searched with the built index and exactly; recall@10 is the share of
the exact 10 nearest found among the index's 10 (each query's own row left out of both lists: it is
trivially found). The search-time knob (``nprobe`` for IVF kinds, ``ef`` for HNSW) is swept upward
and the smallest value reaching ``target_recall`` is stored in the index as its default (when the recall stops
growing before the target, :data:`PLATEAU_GAIN`, the sweep stops and the smallest value within reach of the
best is stored, and the build says that the codes limit the recall); the sweep is written to
``index.json`` (``recall_at_10``, ``recall_sweep``), so ``search`` can say how approximate the index is.

**Memory** (bounded, independent of n except for the index itself): one input chunk, the training sample
(at most ``max_train`` vectors, default 256 x nlist capped at 1M, cut to ``max_index_memory`` / 2 together
with its OPQ-rotated copy when two-level k-means needs one), the (queries x 16,384) similarity block of the
exact search, and the index in RAM, or for on-disk builds one block of ``block_rows`` codes.

**Faults.** The index is built in a temporary directory inside ``output`` and moved into place only when
complete (``index.ivfdata``, then ``index.faiss``, then ``index.json``, the last one atomically: a
directory without ``index.json`` holds no index). A build killed at any moment leaves the previous index
(or none) and a temporary directory that the next build removes; the sample, k-means and the adds are
seeded and ordered, so a rerun gives the same index. One build per output directory at a time (a lock).

Where a change goes: the rule for ``auto`` in :func:`choose_plan`; how a plan becomes FAISS in
:meth:`IndexPlan.factory`; the file checks of the kinds in :mod:`simsiam_kit.retrieval.files`; searching
in :class:`simsiam_kit.retrieval.index.EmbeddingIndex`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from simsiam_kit.errors import UserError, require_extra
from simsiam_kit.retrieval.files import IVF_KINDS

BUILD_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfsq", "ivfpq", "opq_ivfpq")
#: ``auto``'s thresholds (autofaiss ``get_optimal_index_keys_v2``: flat_threshold, quantization_threshold,
#: ivf_flat_threshold)
FLAT_BELOW, QUANTIZE_FROM, IVF_FLAT_BELOW = 1_000, 10_000, 1_000_000
#: PQ code sizes (bytes per vector) tried from the largest, as autofaiss does
PQ_CODES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
#: bits per dimension of the scalar-quantizer codes (``ivfsq``, ``--sq-bits``): 8 and 6 make codes of d and 3d/4 bytes,
#: larger than any PQ code with 8-bit sub-quantizers of >= 2-d sub-vectors (at most d / 2 bytes). Measured on the
#: clustered 512-d vectors of ``benchmarks/index_build.py``: at 200k (IVF1024, nprobe 16) recall@10 PQ256x8 0.947,
#: SQ6 0.969, SQ8 0.994, SQ4 (the bytes of PQ256) 0.896; at 10M in 4 GiB, SQ6 reached 0.893 (PQ256 0.891: the list
#: assignment capped both, :data:`COARSE_EF_ADD`) and its in-RAM build peaked at 6.44 GB (PQ256: 4.82), its lists
#: growing by doubling. So ``auto`` keeps autofaiss's PQ codes; ``--index ivfsq`` when the memory is there
SQ_BITS = (8, 6, 4)
#: the scalar quantizer's ranges (per dimension, min to max of the residuals) come from at most this many vectors
SQ_TRAIN = 65_536
#: ``auto`` rotates (OPQ) only when each PQ sub-vector has at least this many dimensions (d / m >= 4): for finer
#: codes the rotation gains little and its training (about 240 rounds of k-means of all m sub-quantizers) is most of
#: the build (a deviation from autofaiss, which always rotates)
OPQ_MIN_SUBDIM = 4
MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
#: from this many lists on, the coarse quantizer is an HNSW graph over the centroids (``IVF{n}_HNSW32``, as
#: autofaiss builds it) and the centroids come from faiss's two-level k-means: a flat quantizer costs
#: nlist x d per vector added and per k-means point, which at 65,536 lists is hours on a few cores
COARSE_HNSW_FROM = 4_096
#: efSearch of the HNSW coarse quantizer (at least nprobe at search time: faiss searches it for nprobe lists)
COARSE_EF_SEARCH = 128
#: efSearch of the HNSW coarse quantizer while the vectors are added (each vector's nearest list). Measured on the
#: 65,536 centroids of the 10M clustered 512-d vectors of ``benchmarks/index_build.py`` (2 cores, AMD EPYC): the
#: nearest list for 91.5 / 95.4 / 97.2 / 99.1 / 99.8 % of the vectors at 16 / 24 / 32 / 64 / 128, at 109 / 147 / 218 /
#: 297 / 580 us a vector (the assignment is nearly all of the add). faiss's default of 16 (what autofaiss adds with)
#: capped recall@10 at 0.89 whatever the codes (PQ256 0.891, SQ6 0.893, from nprobe 8 on): only 94.0 % of the
#: queries' exact 10 nearest sat in the 8 lists nearest the query, 100 % had each vector gone to its nearest list,
#: and probing more lists barely helps (95.1 % in 32). 24 is the most a 10M build affords within 30 minutes here
COARSE_EF_ADD = 24
#: the PQ codebooks are trained on at most this many (residual) vectors per centroid (256 centroids per
#: sub-quantizer): faiss's default of 256 makes 512-d PQ256 (2-d sub-vectors) train for minutes
PQ_TRAIN_PER_CENTROID = 64
RECALL_K = 10
#: the recall sweep stops when two doublings of the knob together gain less than this much recall@10: the index's
#: codes limit it (measured: IVF65536,PQ256x8 on 10M clustered 512-d vectors reached 0.658 at every nprobe from
#: a few hundred up to all 65,536 lists, and sweeping to the end took 5.5 minutes)
PLATEAU_GAIN = 0.005
DEFAULT_QUERIES = 1_000
DEFAULT_TARGET_RECALL = 0.9
DEFAULT_MAX_MEMORY = "4G"
EXACT_BLOCK = 16_384  # columns of the (queries x block) similarity matrix of the exact search
INDEX_FILE, IVFDATA_FILE, META_FILE = "index.faiss", "index.ivfdata", "index.json"
TMP_PREFIX = ".index-build-"


# ----------------------------------------------------------------------------------- faiss's chatter
@contextlib.contextmanager
def quiet_stdout():
    """Silence what faiss's C++ prints on the process's stdout (``OnDiskInvertedLists`` reports each file
    resize, ``IO_FLAG_ONDISK_SAME_DIR`` each path it rewrites): a command's stdout is its output."""
    import ctypes
    import sys

    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno() if hasattr(sys.stdout, "fileno") else 1
        saved = os.dup(fd)
    except (OSError, ValueError, io.UnsupportedOperation):
        yield
        return
    libc = ctypes.CDLL(None)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, fd)
        os.close(saved)


# ----------------------------------------------------------------------------------- memory sizes
def parse_memory(value: Union[str, int, float], what: str = "--max-index-memory") -> int:
    """Bytes of ``"4G"``, ``"512MB"``, ``"1.5GiB"``, ``"800K"`` or a plain number of bytes (powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise UserError(f"{what} {value!r}: expected a size such as 4G, 512M or 1.5GB")
        n = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())
    if not math.isfinite(n) or n < 1:
        raise UserError(f"{what} {value!r}: must be a positive size")
    return int(n)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class IndexPlan:
    """What to build: a kind and its sizes (``nlist`` lists, ``pq_m`` code bytes, ``opq_dim`` rotation
    output, ``hnsw_m`` links, ``sq_bits`` bits per dimension of a scalar-quantizer code)."""

    kind: str
    dim: int
    nlist: int = 0
    pq_m: int = 0
    opq_dim: int = 0
    hnsw_m: int = 32
    sq_bits: int = 0

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    @property
    def ivf(self) -> bool:
        return self.kind in IVF_KINDS

    @property
    def sq_bytes(self) -> int:
        """Bytes of one scalar-quantizer code (``ivfsq``): ``sq_bits`` per dimension, rounded up."""
        return (self.dim * self.sq_bits + 7) // 8

    @property
    def coarse_hnsw(self) -> bool:
        """Whether the IVF lists are found through an HNSW graph over the centroids (see
        :data:`COARSE_HNSW_FROM`)."""
        return self.ivf and self.nlist >= COARSE_HNSW_FROM

    def factory(self) -> str:
        """The ``faiss.index_factory`` string of the plan."""
        ivf = f"IVF{self.nlist}" + ("_HNSW32" if self.coarse_hnsw else "")
        return {
            "flat": "Flat",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            "ivf": f"{ivf},Flat",
            "ivfsq": f"{ivf},SQ{self.sq_bits}",
            "ivfpq": f"{ivf},PQ{self.pq_m}x8",
            "opq_ivfpq": f"OPQ{self.pq_m}_{self.opq_dim},{ivf},PQ{self.pq_m}x8",
        }[self.kind]

    def index_bytes(self, n: int) -> int:
        """Bytes the index holds for n vectors (codes, ids, graph links, centroids, codebooks, rotation)."""
        d = self.dim
        if self.kind == "flat":
            return 4 * d * n
        if self.kind == "hnsw":
            return (4 * d + 8 * self.hnsw_m) * n
        coarse = (4 * (self.opq_dim or d) + (8 * 32 if self.coarse_hnsw else 0)) * self.nlist
        if self.kind == "ivf":
            return (4 * d + 8) * n + coarse
        if self.kind == "ivfsq":  # + the quantizer's range (min, width) per dimension
            return (self.sq_bytes + 8) * n + coarse + 8 * d
        sub = self.opq_dim or d
        extra = 4 * 256 * sub + (4 * d * self.opq_dim if self.opq_dim else 0)
        return (self.pq_m + 8) * n + coarse + extra

    def make(self):
        """An empty (untrained) FAISS index of the plan, inner product."""
        faiss = require_extra("faiss", "cpu")
        index = faiss.index_factory(self.dim, self.factory(), faiss.METRIC_INNER_PRODUCT)
        if self.pq_m:  # the factory turns on polysemous training (Hamming-distance filtering we never use): slow
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        if self.coarse_hnsw:  # COARSE_EF_SEARCH once the vectors are in (set_coarse_ef)
            set_coarse_ef(index, COARSE_EF_ADD)
        return index

    def train(self, index, x: np.ndarray, seed: int = 0) -> None:
        """Train ``index`` (from :meth:`make`) on the sample ``x``. Below :data:`COARSE_HNSW_FROM` lists this is
        faiss's ``index.train``; from there on the OPQ rotation is trained and applied first, the centroids come
        from faiss's two-level k-means (``faiss.contrib.clustering.two_level_clustering``: sqrt(nlist) clusters,
        then each split in proportion to its size; spherical, as the vectors are compared by inner product),
        are added to the HNSW quantizer, and the IVF finishes its own training (the PQ codebooks)."""
        faiss = require_extra("faiss", "cpu")
        _seed_training(index, seed)
        if not self.coarse_hnsw:
            index.train(x)
            return
        top = faiss.downcast_index(index)
        inner, xt = top, x
        if isinstance(top, faiss.IndexPreTransform):
            for i in range(top.chain.size()):
                vt = top.chain.at(i)
                vt.train(xt)
                xt = vt.apply(xt)
            inner = faiss.downcast_index(top.index)
        ivf = faiss.extract_index_ivf(inner)
        with quiet_stdout():
            centroids = two_level_centroids(xt, self.nlist, seed)
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        # the quantizer holds nlist centroids: faiss trains only the codes (PQ) now, on residuals it computes by
        # assigning each vector to a list: a strided subset of the size the PQ training keeps anyway
        keep = 256 * PQ_TRAIN_PER_CENTROID if self.pq_m else SQ_TRAIN if self.sq_bits else len(xt)
        ivf.train(np.ascontiguousarray(xt[:: max(1, len(xt) // keep)]))
        top.is_trained = True


def two_level_centroids(x: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """faiss's ``contrib.clustering.two_level_clustering`` (sqrt(nlist) spherical k-means clusters, then each split
    into sub-clusters in proportion to its size; the same calls and seeds, so the same centroids), except where it
    fails: a first-level cluster that gets no point or too small a share for one sub-cluster made faiss's k-means
    assert (``clus.k > 0``; seen with 4,096 lists over 64 tight clusters). Here an empty cluster is skipped, every
    other one gets at least one sub-cluster and at most one per point, and the rest moves to the clusters with the
    most points to spare, so that there are always ``nlist`` centroids (``nlist`` <= the rows of ``x``)."""
    faiss = require_extra("faiss", "cpu")
    d = x.shape[1]
    nc1 = max(1, int(round(math.sqrt(nlist))))
    common = {"seed": seed, "spherical": True, "verbose": False, "min_points_per_centroid": 1}
    km = faiss.Kmeans(d, nc1, niter=25, max_points_per_centroid=2000, **common)
    km.train(x)
    _, assign1 = km.assign(x)
    bc = np.bincount(assign1, minlength=nc1)
    cum = np.cumsum(bc)
    alloc = cum * nlist // cum[-1]
    alloc[1:] -= alloc[:-1].copy()
    alloc = np.clip(alloc, (bc > 0).astype(alloc.dtype), bc)  # faiss's rule, bounded: 1 <= sub-clusters <= points
    while alloc.sum() < nlist:  # to the clusters with the most points to spare
        alloc[np.argmax(bc - alloc)] += 1
    while alloc.sum() > nlist:  # from the clusters with the most sub-clusters
        alloc[np.argmax(alloc)] -= 1
    order, i0, parts = assign1.argsort(), 0, []
    for c1 in range(nc1):
        i1 = i0 + int(bc[c1])
        if alloc[c1]:
            sub = faiss.Kmeans(d, int(alloc[c1]), **common)
            sub.train(x[order[i0:i1]])
            parts.append(sub.centroids)
        i0 = i1
    return np.vstack(parts)


def set_coarse_ef(index, ef: int) -> None:
    """efSearch of an IVF index's HNSW coarse quantizer (nothing for a flat quantizer)."""
    faiss = require_extra("faiss", "cpu")
    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if hasattr(q, "hnsw"):
        q.hnsw.efSearch = int(ef)


def default_nlist(n: int) -> int:
    """autofaiss's first choice of the number of IVF lists for n vectors, at most n / 39."""
    if n < 1_000_000:
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    elif n < 10_000_000:
        nlist = 16_384
    else:
        nlist = 65_536
    return int(max(1, min(nlist, n // MIN_POINTS_PER_LIST)))


def _opq_dim(d: int, m: int) -> int:
    # autofaiss: a multiple of m a little above d (or up to 6 m), so the rotation loses nothing
    return (min(d // m, 6) + 1) * m


def check_options(
    kind: str = "auto",
    max_index_memory: Union[str, int] = DEFAULT_MAX_MEMORY,
    nlist: Optional[int] = None,
    pq_m: Optional[int] = None,
    hnsw_m: Optional[int] = None,
    sq_bits: Optional[int] = None,
) -> None:
    """The options of a build that can be judged without the vectors (``index build`` checks them before it reads a
    shard): one :class:`UserError` line naming the first bad one."""
    if kind not in BUILD_KINDS:
        raise UserError(f"unknown index kind '{kind}' (available: {', '.join(BUILD_KINDS)})")
    parse_memory(max_index_memory)
    for name, v in (("nlist", nlist), ("pq_m", pq_m), ("hnsw_m", hnsw_m)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if sq_bits is not None and (isinstance(sq_bits, bool) or sq_bits not in SQ_BITS):
        raise UserError(f"--sq-bits must be 4, 6 or 8, got {sq_bits!r}")
    if sq_bits is not None and kind != "ivfsq":
        raise UserError(f"--sq-bits applies to --index ivfsq, not {kind}")


def choose_plan(
    n: int,
    dim: int,
    max_index_memory: Union[str, int] = DEFAULT_MAX_MEMORY,
    kind: str = "auto",
    nlist: Optional[int] = None,
    pq_m: Optional[int] = None,
    hnsw_m: Optional[int] = None,
    sq_bits: Optional[int] = None,
) -> IndexPlan:
    """The index to build for n vectors of dimension ``dim`` (see the module docstring for ``auto``)."""
    check_options(kind, max_index_memory, nlist, pq_m, hnsw_m, sq_bits)
    if n < 1:
        raise UserError("no vectors to index")
    budget = parse_memory(max_index_memory)
    lists = nlist or default_nlist(n)
    if lists > n:
        raise UserError(f"--nlist {lists} is larger than the number of vectors ({n})")
    if kind == "auto":
        if n < FLAT_BELOW:
            return IndexPlan("flat", dim)
        m_fit = int((budget / (4 * n) - dim) // 2)  # links an HNSW graph can afford within the budget
        if n < QUANTIZE_FROM:
            return IndexPlan("hnsw", dim, hnsw_m=hnsw_m or 16)
        if m_fit >= 8:
            return IndexPlan("hnsw", dim, hnsw_m=hnsw_m or min(m_fit, 32))
        ivf = IndexPlan("ivf", dim, nlist=lists)
        if n < IVF_FLAT_BELOW and ivf.index_bytes(n) <= budget:
            return ivf
        for m in (pq_m,) if pq_m else PQ_CODES:
            if m >= dim and not pq_m:
                continue
            if m * OPQ_MIN_SUBDIM > dim and dim % m == 0:  # sub-vectors of < 4 dims: PQ alone (see above)
                plan = IndexPlan("ivfpq", dim, nlist=lists, pq_m=m)
            else:
                plan = IndexPlan("opq_ivfpq", dim, nlist=lists, pq_m=m, opq_dim=_opq_dim(dim, m))
            if plan.index_bytes(n) <= budget:
                return plan
        smallest = IndexPlan("opq_ivfpq", dim, nlist=lists, pq_m=pq_m or 4, opq_dim=_opq_dim(dim, pq_m or 4))
        raise UserError(
            f"--max-index-memory {format_bytes(budget)} is too small for {n} vectors of dimension {dim}: the "
            f"smallest index ({smallest.factory()}) needs {format_bytes(smallest.index_bytes(n))}"
        )
    if kind == "flat":
        return IndexPlan("flat", dim)
    if kind == "hnsw":
        return IndexPlan("hnsw", dim, hnsw_m=hnsw_m or 32)
    if kind == "ivf":
        return IndexPlan("ivf", dim, nlist=lists)
    if kind == "ivfsq":
        return IndexPlan("ivfsq", dim, nlist=lists, sq_bits=sq_bits or 8)
    m = pq_m or next((c for c in PQ_CODES if c <= dim // 4 and dim % c == 0), 0)
    if kind == "ivfpq":
        if not m or dim % m:
            raise UserError(f"--pq-m {m} must divide the dimension {dim} for ivfpq (opq_ivfpq has no such limit)")
        return IndexPlan("ivfpq", dim, nlist=lists, pq_m=m)
    m = m or 4
    return IndexPlan("opq_ivfpq", dim, nlist=lists, pq_m=m, opq_dim=_opq_dim(dim, m))


def train_size(plan: IndexPlan, n: int, max_train: Optional[int] = None) -> int:
    """Vectors sampled to train the plan: 256 per list (at least 39), and 10,000 at least for the PQ
    codebooks (256 centroids each), capped by ``max_train`` (default 1M) and n."""
    if plan.kind in ("flat", "hnsw"):
        return 0
    want = 256 * plan.nlist
    if plan.pq_m:
        want = max(want, 10_000)
    cap = max_train if max_train is not None else 1_000_000
    floor = 0 if plan.coarse_hnsw else MIN_POINTS_PER_LIST * plan.nlist  # two-level k-means: groups of ~sqrt(nlist)
    return int(min(n, max(min(want, cap), floor)))


# ----------------------------------------------------------------------------------- the input
class VectorSource:
    """Re-iterable float32 (rows, dim) chunks: ``n`` vectors in all, ``chunks()`` yields them in order
    (a fresh pass each call), ``describe`` says where they come from."""

    def __init__(self, chunks: Callable[[], Iterable[np.ndarray]], n: int, dim: int, describe: str = "vectors"):
        self._chunks, self.n, self.dim, self.describe = chunks, int(n), int(dim), describe

    def chunks(self) -> Iterator[np.ndarray]:
        seen = 0
        for c in self._chunks():
            c = np.asarray(c)
            if c.ndim != 2 or c.shape[1] != self.dim or c.dtype.kind != "f":
                raise UserError(f"{self.describe}: chunk of shape {c.shape} ({c.dtype}), expected (rows, {self.dim})")
            c = np.ascontiguousarray(c, dtype=np.float32)
            if not np.isfinite(c).all():
                raise UserError(f"{self.describe}: non-finite values in rows {seen}..{seen + len(c) - 1}")
            seen += len(c)
            if seen > self.n:
                raise UserError(f"{self.describe}: more than the {self.n} vectors announced")
            yield c
        if seen != self.n:
            raise UserError(f"{self.describe}: {seen} vectors, {self.n} announced")


def chunk_source(chunks: Callable[[], Iterable[np.ndarray]], n: Optional[int] = None, dim: Optional[int] = None):
    """A :class:`VectorSource` over ``chunks()`` (called once per pass); ``n`` and ``dim`` are counted
    in an extra pass when not given."""
    if n is None or dim is None:
        n, dim = 0, dim
        for c in chunks():
            c = np.asarray(c)
            if c.ndim != 2:
                raise UserError(f"chunk of shape {c.shape}, expected (rows, dim)")
            n, dim = n + len(c), dim or c.shape[1]
        if not n:
            raise UserError("no vectors to index")
        assert dim is not None  # the first of the n > 0 rows' chunks set it
    return VectorSource(chunks, n, dim)


def shards_source(directory, verify: bool = True) -> VectorSource:
    """The embeddings of a complete shard directory (``simsiam-kit embed``), shard by shard in the
    manifest's order (rows are numbered in that order); each shard's files are checked against the
    manifest's sizes and sha256 on every pass (:func:`simsiam_kit.retrieval.shards.iter_shards`)."""
    from simsiam_kit.retrieval.shards import iter_shards, read_manifest

    d = Path(directory).expanduser()
    m = read_manifest(d)
    if m is None:
        raise UserError(f"--embeddings {d}: no manifest.json (a directory written by `simsiam-kit embed`)")
    if not m.get("complete"):
        raise UserError(f"--embeddings {d}: the shards are not complete; finish them with `simsiam-kit embed --resume`")
    n = sum(s.rows for s in m["shards"])

    def chunks():
        for _, z, _ in iter_shards(d, verify=verify):
            if len(z):
                yield np.asarray(z, dtype=np.float32)

    return VectorSource(chunks, n, m["dim"], f"the shards of {d}")


def array_source(x: np.ndarray, chunk_rows: int = 65_536) -> VectorSource:
    """A :class:`VectorSource` over an in-memory (or memory-mapped) (n, d) array, in chunks."""
    x = np.asarray(x) if not isinstance(x, np.memmap) else x
    return VectorSource(lambda: (x[s : s + chunk_rows] for s in range(0, len(x), chunk_rows)), len(x), x.shape[1])


# ----------------------------------------------------------------------------------- exact top-k
class ExactTopK:
    """Running exact top-k of a few query vectors over chunks seen one after another (ids are rows in the
    order of the chunks); memory: (queries x :data:`EXACT_BLOCK`) similarities plus the (queries x k) best."""

    def __init__(self, queries: np.ndarray, k: int):
        self.q, self.k = np.ascontiguousarray(queries, dtype=np.float32), k
        self.v = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.i = np.full((len(queries), k), -1, dtype=np.int64)
        self.seen = 0

    def update(self, chunk: np.ndarray) -> None:
        faiss = require_extra("faiss", "cpu")
        for s in range(0, len(chunk), EXACT_BLOCK):
            block = np.ascontiguousarray(chunk[s : s + EXACT_BLOCK], dtype=np.float32)
            kk = min(self.k, len(block))
            # faiss's blocked GEMM + heap (threads, no (queries x block) copies to partition): 1.7x numpy's
            # argpartition here; on equal similarities its heap keeps the earlier row, as the merge below does
            sv, top = faiss.knn(self.q, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
            v = np.concatenate([self.v, sv], 1)
            i = np.concatenate([self.i, top + self.seen + s], 1)
            o = np.lexsort((i, -v), axis=1)[:, : self.k]  # similarity descending, ties by lower row
            self.v, self.i = np.take_along_axis(v, o, 1), np.take_along_axis(i, o, 1)
        self.seen += len(chunk)


def recall_at_k(found: np.ndarray, exact: np.ndarray, own_rows: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each query's exact k nearest (its own row left out) among the k it was given (own row
    left out too): ``found`` and ``exact`` hold at least k + 1 ids per query, best first."""
    hits = 0.0
    for f, e, r in zip(found, exact, own_rows):
        f = [x for x in f.tolist() if x != r and x >= 0][:k]
        e = [x for x in e.tolist() if x != r][:k]
        hits += len(set(f) & set(e)) / max(len(e), 1)
    return hits / max(len(found), 1)


# ----------------------------------------------------------------------------------- building
@dataclass
class BuildResult:
    """What :func:`build_index` wrote (also in ``index.json``)."""

    output: Path
    meta: dict


def _sample_rows(n: int, n_train: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    take = min(n, n_train + n_queries)
    rows = rng.choice(n, size=take, replace=False) if take < n else rng.permutation(n)
    queries = np.sort(rows[:n_queries])
    train = np.sort(rows[n_queries:take])
    return train, queries


def _gather(source: VectorSource, rows: list[np.ndarray]) -> list[np.ndarray]:
    """The vectors of each sorted row list, in one pass over the source."""
    out = [np.empty((len(r), source.dim), dtype=np.float32) for r in rows]
    start = 0
    for chunk in source.chunks():
        stop = start + len(chunk)
        for r, o in zip(rows, out):
            lo, hi = np.searchsorted(r, [start, stop])
            if hi > lo:
                o[lo:hi] = chunk[r[lo:hi] - start]
        start = stop
    return out


def _set_knob(index, plan: IndexPlan, value: int) -> None:
    faiss = require_extra("faiss", "cpu")
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    elif plan.ivf:
        faiss.extract_index_ivf(index).nprobe = int(value)


def _knob_values(plan: IndexPlan) -> list[int]:
    if plan.kind == "hnsw":
        return [16, 32, 64, 128, 256, 512, 1024]
    if plan.ivf:
        vals, v = [], 1
        while v < plan.nlist:
            vals.append(v)
            v *= 2
        return vals + [plan.nlist]
    return []


def build_index(
    source: VectorSource,
    output,
    kind: str = "auto",
    max_index_memory: Union[str, int] = DEFAULT_MAX_MEMORY,
    nlist: Optional[int] = None,
    pq_m: Optional[int] = None,
    hnsw_m: Optional[int] = None,
    sq_bits: Optional[int] = None,
    on_disk: Optional[bool] = None,
    queries: int = DEFAULT_QUERIES,
    target_recall: float = DEFAULT_TARGET_RECALL,
    max_train: Optional[int] = None,
    block_rows: int = 1_000_000,
    seed: int = 0,
    extra_meta: Optional[dict] = None,
    log: Optional[Callable[[str], None]] = None,
) -> BuildResult:
    """Build an index of ``source`` into ``output`` (``index.faiss`` [+ ``index.ivfdata``] + ``index.json``,
    loadable by :meth:`EmbeddingIndex.load`); see the module docstring. ``on_disk``: None = when the index is
    estimated larger than ``max_index_memory``."""
    faiss = require_extra("faiss", "cpu")
    say = log or (lambda s: None)
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {target_recall}")
    if queries < 0:
        raise UserError(f"--queries must be >= 0, got {queries}")
    n, d = source.n, source.dim
    plan = choose_plan(n, d, max_index_memory, kind, nlist, pq_m, hnsw_m, sq_bits)
    budget = parse_memory(max_index_memory)
    est = plan.index_bytes(n)
    if on_disk is None:
        on_disk = plan.ivf and est > budget
    if on_disk and not plan.ivf:
        raise UserError(f"on-disk inverted lists need an IVF kind (ivf, ivfsq, ivfpq, opq_ivfpq), not {plan.kind}")
    # the held-out queries first (at most a tenth of the vectors), the training sample from the rest
    n_queries = min(queries, n // 10) if plan.approximate else 0
    n_train = min(train_size(plan, n, max_train), n - n_queries)
    row_bytes = 4 * (d + (plan.opq_dim if plan.coarse_hnsw else 0))  # + the rotated copy two-level k-means needs
    floor = 0 if plan.coarse_hnsw else MIN_POINTS_PER_LIST * plan.nlist
    if n_train * row_bytes > budget / 2 and n_train > floor:
        n_train = max(floor, int(budget / 2 / row_bytes))
    say(
        f"index {plan.factory()} for {n} vectors of dim {d} from {source.describe}: about {format_bytes(est)}"
        f"{' on disk' if on_disk else ''}; training on {n_train}, recall on {n_queries} held-out vectors"
    )
    from simsiam_kit.retrieval.shards import shard_lock

    out = Path(output).expanduser()
    lock = shard_lock(out, "embedding run or index build").acquire()  # the lock of embed's shard writer too
    try:
        for stale in out.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's; we hold the lock
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
        t0 = time.perf_counter()
        train_rows, query_rows = _sample_rows(n, n_train, n_queries, seed)
        train_x, query_x = _gather(source, [train_rows, query_rows]) if (n_train or n_queries) else (None, None)
        index = plan.make()
        if n_train:
            assert train_x is not None  # gathered above whenever n_train > 0
            plan.train(index, train_x, seed)
        del train_x
        t_train = time.perf_counter() - t0
        exact = ExactTopK(query_x, RECALL_K + 1) if n_queries and query_x is not None else None
        blocks: list[Path] = []
        if on_disk:
            trained = work / "trained.faiss"
            faiss.write_index(index, str(trained))
            block, block_n = faiss.read_index(str(trained)), 0
        start = 0
        for chunk in source.chunks():
            if exact is not None:
                exact.update(chunk)
            if on_disk:
                block.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
                block_n += len(chunk)
                if block_n >= block_rows:
                    blocks.append(work / f"block{len(blocks):05d}.faiss")
                    faiss.write_index(block, str(blocks[-1]))
                    block, block_n = faiss.read_index(str(trained)), 0
            else:
                index.add(chunk)
            if (start + len(chunk)) * 10 // n > start * 10 // n:  # every tenth
                say(f"  added {start + len(chunk)}/{n}")
            start += len(chunk)
        if on_disk:
            if block_n:
                blocks.append(work / f"block{len(blocks):05d}.faiss")
                faiss.write_index(block, str(blocks[-1]))
            del block
            with quiet_stdout():
                _merge_ondisk(faiss, index, blocks, work / IVFDATA_FILE)
            for b in blocks:
                b.unlink()
            trained.unlink()
        t_add = time.perf_counter() - t0 - t_train
        if plan.coarse_hnsw:
            set_coarse_ef(index, COARSE_EF_SEARCH)
        sweep, knob, recall = [], None, (1.0 if not plan.approximate else None)
        plateau = False
        if exact is not None:  # n_queries > 0
            values = _knob_values(plan)
            name = "nprobe" if plan.ivf else "ef"
            for v in values:
                _set_knob(index, plan, v)
                _, found = index.search(query_x, RECALL_K + 1)
                r = recall_at_k(found, exact.i, query_rows)
                sweep.append({name: v, "recall_at_10": round(r, 4)})
                knob, recall = v, r
                if r >= target_recall:
                    break
                if len(sweep) >= 3 and r - sweep[-3]["recall_at_10"] < PLATEAU_GAIN:
                    plateau = True  # the codes limit the recall, not the knob: searching wider only costs time
                    break
            if recall is not None and recall < target_recall:  # the smallest setting within reach of the best
                best = max(x["recall_at_10"] for x in sweep)
                first = next(x for x in sweep if x["recall_at_10"] >= best - PLATEAU_GAIN)
                knob, recall = int(first[name]), float(first["recall_at_10"])
                _set_knob(index, plan, knob)
                say(
                    f"recall@10 stops at {best:.3f}, below the target {target_recall}"
                    + (f" ({name} {sweep[-1][name]} finds no more than {name} {sweep[-3][name]})" if plateau else "")
                    + (
                        ": the PQ codes limit it (a larger --pq-m, or --index ivfsq / ivf with more --max-index-memory)"
                        if plan.pq_m
                        else ": the SQ codes limit it (a larger --sq-bits, or --index ivf with more --max-index-memory)"
                        if plan.sq_bits
                        else ""
                    )
                )
        elif plan.approximate:
            knob = {"hnsw": 64}.get(plan.kind, min(plan.nlist, 16))
            _set_knob(index, plan, knob)
        if plan.ivf and knob is None:
            knob = 1
        nprobe, ef_search = 16, None
        if plan.ivf or plan.kind == "hnsw":
            assert knob is not None  # set by the sweep or the defaults above
            nprobe = int(knob) if plan.ivf else 16
            ef_search = int(knob) if plan.kind == "hnsw" else None
        meta = {
            "dim": d,
            "kind": plan.kind,
            "backend": "faiss",
            "nlist": plan.nlist,
            "nprobe": nprobe,
            "hnsw_m": plan.hnsw_m,
            "ef_search": ef_search,
            "rerank": 16,
            "ntotal": int(index.ntotal),
            "factory": plan.factory(),
            "pq_m": plan.pq_m,
            "opq_dim": plan.opq_dim,
            "sq_bits": plan.sq_bits,
            "approximate": plan.approximate,
            "on_disk": bool(on_disk),
            "recall_at_10": None if recall is None else round(float(recall), 4),
            "recall_queries": int(n_queries),
            "target_recall": target_recall,
            "recall_sweep": sweep,
            "recall_plateau": plateau,
            "estimated_bytes": int(est),
            "max_index_memory": int(budget),
            "train_vectors": int(n_train),
            "seed": seed,
            "source": source.describe,
            "seconds": {
                "train": round(t_train, 3),
                "add": round(t_add, 3),
                "total": round(time.perf_counter() - t0, 3),
            },
        }
        meta.update(extra_meta or {})
        if on_disk:  # the index file names its lists' file; a bare name, found next to it (IO_FLAG_ONDISK_SAME_DIR)
            faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = IVFDATA_FILE
        faiss.write_index(index, str(work / INDEX_FILE))
        del index
        _commit(work, out, on_disk, meta)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()
    say(
        f"wrote {plan.factory()} ({meta['ntotal']} vectors) to {out}"
        + (f": recall@10 {meta['recall_at_10']:.3f} at {'nprobe' if plan.ivf else 'ef'}={knob}" if sweep else "")
    )
    return BuildResult(out, meta)


def _seed_training(index, seed: int) -> None:
    """Seed the k-means of the IVF lists and of the PQ codebooks (faiss seeds its OPQ training itself)."""
    faiss = require_extra("faiss", "cpu")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.seed = seed + 1
            pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID


def _merge_ondisk(faiss, index, blocks: list[Path], ivfdata: Path) -> None:
    """faiss's ``contrib.ondisk.merge_ondisk``: the blocks' lists, memory-mapped, merged into one
    ``OnDiskInvertedLists`` file that replaces the (empty, trained) index's lists."""
    ivf = faiss.extract_index_ivf(index)
    lists, keep = faiss.InvertedListsPtrVector(), []
    for b in blocks:
        part = faiss.read_index(str(b), faiss.IO_FLAG_MMAP)
        pivf = faiss.extract_index_ivf(part)
        pivf.own_invlists = False
        keep.append((part, pivf.invlists))
        lists.push_back(pivf.invlists)
    od = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ntotal = od.merge_from_multiple(lists.data(), lists.size(), False) if blocks else 0
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(od, True)
    od.this.disown()
    del keep


def _commit(work: Path, out: Path, on_disk: bool, meta: dict) -> None:
    """Move a finished build into ``out``: the lists' file, the index, then ``index.json`` (atomically) last."""
    from simsiam_kit.utils.io import atomic_write_json

    (out / META_FILE).unlink(missing_ok=True)  # from here until the end, the directory holds no index
    for stale in ("index_vectors.npy",) + (() if on_disk else (IVFDATA_FILE,)):
        (out / stale).unlink(missing_ok=True)
    if on_disk:
        os.replace(work / IVFDATA_FILE, out / IVFDATA_FILE)
    os.replace(work / INDEX_FILE, out / INDEX_FILE)
    _fsync_dir(out)
    atomic_write_json(out / META_FILE, meta)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def plan_summary(plan: IndexPlan, n: int) -> dict:
    """The plan as a JSON object, with its estimated size for n vectors."""
    return {**asdict(plan), "factory": plan.factory(), "estimated_bytes": plan.index_bytes(n)}
