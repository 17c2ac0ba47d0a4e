"""Which runtime embeds fastest on this machine: chosen by a short timed probe on the first batch, cached per
machine, or forced (``simsiam-kit embed --runtime``).

Runtimes (:data:`RUNTIMES`) of one exported model:

* ``ort-int8``: the model through onnxruntime when it is an int8 model (``export onnx --quantize int8``);
* ``ort-fp32``: the model through onnxruntime when it is an fp32 (or fp16) model;
* ``torch-bf16``: the weights the model was exported from (its ``source`` metadata, when that file is here)
  in PyTorch under bf16 autocast with channels_last, where the CPU has native bf16 (AVX512-BF16 or AMX); on a
  GPU onnxruntime's CUDA provider is used without a probe.

Which is fastest depends on the CPU kind (int8 pays far more on AMD EPYC with AVX512-VNNI than the bf16 path
does; on Intel Xeon with AMX the bf16 tiles close much of the gap, see docs/benchmarks.md), so it is measured:
:func:`choose_runtime` takes the candidate encoders and a sample batch and returns the fastest, through the
core's probe (:func:`simsiam_kit.utils.probe.choose_fastest`: alternating timed calls, a JSON cache keyed by
the CPU model, its bf16/AMX/VNNI flags and the model's sha256). :func:`open_embedder` builds the candidates
of a model file and returns an embedder that chooses on its first batch (what ``simsiam-kit embed`` runs);
a streaming pipeline that has its own first batch calls :func:`runtime_candidates` and :func:`choose_runtime`.

The torch runtime computes the same function as the exported model only while its source weights are the
ones exported; before it is used its output on the first images is compared with the model's (cosine
:data:`MIN_COSINE`), and a mismatch drops it with a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.export.embedder import OnnxEmbedder, _is_batch, check_finite_embeddings, l2_normalize, preprocess
from simsiam_kit.utils.io import file_sha256

RUNTIMES = ("auto", "ort-int8", "torch-bf16", "ort-fp32")
#: agreement of the torch runtime with the exported model on the first images (minimum cosine over them):
#: bf16 rounding stays far above the fp32 bound, int8 quantisation above the int8 one
MIN_COSINE = {"fp32": 0.99, "fp16": 0.99, "int8": 0.95}
CHECK_IMAGES = 4
#: seconds before each timed probe call: onnxruntime's intra-op threads spin after a run and would slow the
#: runtime timed next (``benchmarks/embed_throughput.py`` pauses alike)
PAUSE_S = 0.2


class TorchEmbedder:
    """The encoder an ONNX model was exported from, in PyTorch on the CPU under bf16 autocast with channels_last;
    the same preprocessing and attributes as :class:`~simsiam_kit.export.embedder.OnnxEmbedder` (``path`` and
    ``meta`` are the ONNX model's: the embeddings stand for it)."""

    def __init__(self, onnx: OnnxEmbedder, module, source: str):
        import torch

        self.path, self.meta, self.dim = onnx.path, onnx.meta, onnx.dim
        self.batch_size, self.normalize, self.source = onnx.batch_size, onnx.normalize, source
        self.image_size, self.mean, self.std = onnx.image_size, onnx.mean, onnx.std
        self.module = module.eval().to(memory_format=torch.channels_last)
        self.provider = "torch bf16 autocast + channels_last (CPU)"

    def embed(self, images, normalize: Optional[bool] = None) -> np.ndarray:
        import torch

        x = torch.from_numpy(preprocess(images, self.image_size, self.mean, self.std))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.module(x.contiguous(memory_format=torch.channels_last)).float().numpy()
        check_finite_embeddings(z, f"{self.source} (torch bf16 runtime of {self.path})")
        return l2_normalize(z) if (self.normalize if normalize is None else normalize) else z


def torch_runtime(onnx: OnnxEmbedder) -> tuple[Optional[TorchEmbedder], str]:
    """(the torch bf16 runtime of ``onnx``'s source weights, "") or (None, why it is not available here)."""
    from simsiam_kit.utils.device import cpu_supports_bf16

    if not cpu_supports_bf16():
        return None, "this CPU has no native bf16 (AVX512-BF16 or AMX)"
    source = str(onnx.meta.get("source") or "")
    if not source or source == "random" or not Path(source).expanduser().exists():
        return None, f"the weights it was exported from ({source or 'not recorded'}) are not here"
    from simsiam_kit.export.encoder import load_encoder

    try:
        enc = load_encoder(
            source,
            head=onnx.meta.get("head", "backbone"),
            image_size=onnx.image_size,
            arch=onnx.meta.get("arch"),
            stem=onnx.meta.get("stem"),
        )
    except UserError as e:
        return None, f"its source weights do not load ({str(e)[:200]})"
    if enc.embedding_dim != onnx.dim or not np.allclose(enc.mean, onnx.mean) or not np.allclose(enc.std, onnx.std):
        return None, f"its source weights {source} no longer describe the model (width or mean/std differ)"
    return TorchEmbedder(onnx, enc.module, source), ""


def runtime_candidates(
    model, device: str = "auto", batch_size: int = 64, threads: Optional[int] = None, log=None, torch: bool = True
) -> dict:
    """``{runtime name: embedder}`` of the model file: its onnxruntime runtime (``ort-int8`` or ``ort-fp32`` by
    its precision), and ``torch-bf16`` where available on the CPU (why not is logged; ``torch=False``: not
    tried)."""
    say = log or (lambda s: None)
    ort = OnnxEmbedder(model, device=device, batch_size=batch_size, threads=threads)
    name = "ort-int8" if ort.meta.get("precision") == "int8" else "ort-fp32"
    out = {name: ort}
    if ort.provider != "CPUExecutionProvider" or not torch:
        return out  # a GPU: onnxruntime's provider, no CPU probe
    tr, why = torch_runtime(ort)
    if tr is not None:
        out["torch-bf16"] = tr
    else:
        say(f"runtime torch-bf16 not available: {why}")
    return out


def choose_runtime(
    candidates: Mapping[str, object],
    sample,
    facts: Optional[Mapping] = None,
    force: Optional[str] = None,
    rounds: int = 2,
    cache: Optional[Path] = None,
    use_cache: bool = True,
    pause: float = PAUSE_S,
):
    """The fastest of ``candidates`` (``{name: embedder with .embed(batch)}``) on ``sample`` (one batch of
    images), as a :class:`simsiam_kit.utils.probe.Choice`. ``facts`` join the CPU model and flags in the cache
    key (the model's sha256, at least); ``force``: a runtime name, chosen without timing; ``pause``: seconds
    before each timed call (:data:`PAUSE_S`)."""
    from simsiam_kit.utils.probe import choose_fastest

    if force is not None and force != "auto" and force not in candidates:
        raise UserError(f"--runtime {force}: not available for this model here (available: {', '.join(candidates)})")
    n = len(sample)
    fns: dict[str, Callable[[], object]] = {k: (lambda e=e: e.embed(sample)) for k, e in candidates.items()}
    return choose_fastest(
        fns,
        "embed runtime",
        {**dict(facts or {}), "batch": n},
        force=None if force == "auto" else force,
        rounds=rounds,
        cache=cache,
        use_cache=use_cache,
        pause=pause,
    )


class AutoEmbedder:
    """An embedder that chooses its runtime on its first batch (:func:`choose_runtime`), then is that runtime.

    Before the first batch ``provider`` reads "auto (...)"; after it, the chosen runtime's provider, and
    :attr:`choice` holds the :class:`~simsiam_kit.utils.probe.Choice` (name, how, timings, reason)."""

    def __init__(
        self, candidates: Mapping[str, object], facts: Mapping, force: Optional[str] = None, log=None, **choose_kw
    ):
        if not candidates:
            raise UserError("no runtime to embed with")
        self.candidates = dict(candidates)
        first = next(iter(self.candidates.values()))
        self.path, self.meta, self.dim, self.batch_size = first.path, first.meta, first.dim, first.batch_size
        self.facts, self.force, self.log, self.choose_kw = dict(facts), force, log or (lambda s: None), choose_kw
        self.choice = None
        self.chosen = None

    @property
    def provider(self) -> str:
        if self.chosen is None:
            return f"auto (fastest of {', '.join(self.candidates)}, measured on the first batch)"
        return f"{self.choice.name}: {self.chosen.provider}"

    def _agrees(self, name: str, images) -> bool:
        """The torch runtime against the model on the first images (its source weights may have changed)."""
        ref_name = next(k for k in self.candidates if k.startswith("ort-"))
        first = images[:CHECK_IMAGES]
        a = self.candidates[ref_name].embed(first, normalize=True)
        b = self.candidates[name].embed(first, normalize=True)
        cos = float((a * b).sum(1).min())
        bound = MIN_COSINE.get(str(self.meta.get("precision", "fp32")), 0.99)
        if cos < bound:
            self.log(
                f"runtime {name} dropped: its weights ({getattr(self.candidates[name], 'source', '?')}) give "
                f"embeddings with cosine {cos:.4f} < {bound} to {self.path.name}'s (not the weights exported)"
            )
            return False
        return True

    def _choose(self, images) -> None:
        if len(self.candidates) > 1:
            for name in [k for k in self.candidates if k == "torch-bf16"]:
                if not self._agrees(name, images):
                    if self.force == name:
                        raise UserError(f"--runtime {name}: its weights do not compute {self.path.name}")
                    del self.candidates[name]
        self.choice = choose_runtime(self.candidates, images, self.facts, self.force, **self.choose_kw)
        self.chosen = self.candidates[self.choice.name]
        self.log(f"runtime: {self.choice.name}, {self.choice.reason}")

    def embed(self, images, normalize: Optional[bool] = None) -> np.ndarray:
        if self.chosen is None:
            if not _is_batch(images):
                images = [images]
            elif isinstance(images, tuple):
                images = list(images)
            self._choose(images)
        return self.chosen.embed(images, normalize=normalize)


def open_embedder(
    model,
    runtime: str = "auto",
    device: str = "auto",
    batch_size: int = 64,
    threads: Optional[int] = None,
    log=None,
    cache: Optional[Path] = None,
) -> AutoEmbedder:
    """An embedder of the model file that runs on the fastest runtime here (``runtime="auto"``: measured on its
    first batch, or cached), or on ``runtime`` (one of :data:`RUNTIMES`)."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: unknown (available: {', '.join(RUNTIMES)})")
    path = Path(model)
    # a forced onnxruntime runtime needs no torch weights: not loaded, nothing said about them
    candidates = runtime_candidates(path, device, batch_size, threads, log=log, torch=not runtime.startswith("ort-"))
    if runtime != "auto" and runtime not in candidates:
        have = ", ".join(candidates)
        raise UserError(f"--runtime {runtime}: not available for {path.name} here (available: {have})")
    facts = {"model_sha256": file_sha256(path), "device": device, "threads": threads}
    return AutoEmbedder(
        candidates, facts, force=None if runtime == "auto" else runtime, log=log, cache=cache, use_cache=True
    )


def index_runtime(index_dir) -> Optional[str]:
    """The runtime that embedded an index directory (its ``embed.json`` ``provider`` reads "NAME: ..." when
    :func:`open_embedder` chose it), or None (an older directory, or an unreadable manifest)."""
    from simsiam_kit.retrieval.files import read_json

    try:
        provider = read_json(Path(index_dir) / "embed.json", dict).get("provider")
    except UserError:
        return None
    name = str(provider).split(":", 1)[0] if provider else ""
    return name if name in RUNTIMES[1:] else None


def open_for_index(model, index_dir, device: str = "auto", log=None):
    """The embedder for queries against an index directory: the runtime that embedded the index when it is
    available here (so a query and its indexed copy get the same rounding), else the model in onnxruntime."""
    name = index_runtime(index_dir)
    if name == "torch-bf16":
        try:
            return open_embedder(model, "torch-bf16", device=device, log=log)
        except UserError as e:
            if log is not None:
                log(f"warning: the index was embedded with torch-bf16, not available here ({e}); using onnxruntime")
    return OnnxEmbedder(model, device=device)
