"""What every evaluation protocol shares: one base settings class (:class:`EvalSettings`) and one input
bundle built once from it (:class:`EvalInputs`: datasets, classes, loaded backbone, resolved image
settings, device, precision, output directory).

A protocol (kNN in :mod:`simsiam_kit.evaluation.knn`, the linear probe in
:mod:`simsiam_kit.evaluation.linear`) extends :class:`EvalSettings` with its own options, checks them
once in ``validate()`` and ``run``s on the bundle (detectron2 ``evaluation/evaluator.py``, lightly
``utils/benchmarking/linear_classifier.py``). Detection transfer has its own inputs (COCO sets, a
detector config) and its engines share one signature in :mod:`simsiam_kit.evaluation.detection.engines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from simsiam_kit.config import DEFAULT_DATA_ROOT
from simsiam_kit.features import FEATURE_BATCH


@dataclass(frozen=True)
class EvalSettings:
    """The options of every image-classification protocol (the results' ``settings`` record)."""

    weights: str
    train_data: str
    test_data: str
    arch: Optional[str] = None
    stem: Optional[str] = None
    like: Optional[str] = None  # with weights "random": the run whose init, arch, stem and image settings to take
    batch_size: int = FEATURE_BATCH
    device: str = "auto"
    precision: str = "auto"  # feature extraction: auto = fp32 (simsiam_kit.features.feature_precision)
    image_size: Optional[int] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    workers: int = 2
    root: str = DEFAULT_DATA_ROOT
    download: bool = False
    skip_bad_images: bool = False
    overwrite: bool = False  # replace the results of an earlier evaluation in the output directory
    plots: bool = True


@dataclass(frozen=True)
class EvalInputs:
    """The shared preamble of a protocol, built once by :meth:`build`."""

    output: Path
    train: Any  # ImageDataset
    test: Any
    classes: list
    loaded: Any  # LoadedBackbone
    img: Any  # ImageSettings
    device: Any  # torch.device
    precision: Any  # simsiam_kit.utils.device.Precision

    @classmethod
    def build(
        cls,
        s: EvalSettings,
        output: Path,
        log: Callable[[str], None] = print,
        seed: Optional[int] = None,
        check_train: Optional[Callable[[Any], None]] = None,
    ) -> "EvalInputs":
        """Load and check both datasets, then refuse an output holding earlier results (after the data, so a
        missing dataset is never hidden behind earlier results; ``check_train`` runs on the training set before
        the backbone loads), load the backbone (``seed``: its random init), resolve image settings, device and
        precision. The output directory is not created here."""
        from simsiam_kit.evaluation.common import check_output, check_same_classes, eval_image_settings, load_labelled
        from simsiam_kit.features import feature_precision
        from simsiam_kit.utils.device import resolve_device
        from simsiam_kit.weights import load_backbone

        output = Path(output)
        train = load_labelled(s.train_data, "train", s.root, s.download, s.skip_bad_images)
        test = load_labelled(s.test_data, "test", s.root, s.download, s.skip_bad_images)
        check_output(output, s.overwrite)
        classes = check_same_classes(train, test, s.train_data, s.test_data)
        if check_train is not None:
            check_train(train)
        loaded = load_backbone(s.weights, s.arch, s.stem, like=s.like, **({} if seed is None else {"seed": seed}))
        if loaded.notice():
            log(loaded.notice())
        img = eval_image_settings(loaded, train, s.image_size, s.mean, s.std)
        device = resolve_device(s.device)
        return cls(output, train, test, classes, loaded, img, device, feature_precision(s.precision, device))

    def prepare_output(self, overwrite: bool) -> Path:
        from simsiam_kit.evaluation.common import prepare_output

        return prepare_output(self.output, overwrite)

    def writing_output(self, overwrite: bool):
        """``with inputs.writing_output(overwrite):`` the output directory prepared and locked while the protocol
        writes there (:func:`simsiam_kit.evaluation.common.writing_output`: a second evaluation into it at the
        same time is refused)."""
        from simsiam_kit.evaluation.common import writing_output

        return writing_output(self.output, overwrite)

    def settings_record(self) -> dict:
        """What the bundle resolved, for the results' ``settings`` (image settings, backbone, device)."""
        return dict(
            mean=list(self.img.mean),
            std=list(self.img.std),
            image_size=self.img.image_size,
            image_settings_from=dict(self.img.sources),
            arch=self.loaded.arch,
            stem=self.loaded.stem,
            weights_source=self.loaded.source,
            device=str(self.device),
            precision=self.precision.name,
        )

    def feature_kwargs(self, batch_size: int, workers: int, **extra) -> dict:
        """Keyword arguments of :func:`simsiam_kit.features.extract_features` for this bundle."""
        return dict(
            device=self.device,
            batch_size=batch_size,
            precision=self.precision,
            mean=self.img.mean,
            std=self.img.std,
            image_size=self.img.image_size,
            workers=workers,
            **extra,
        )
