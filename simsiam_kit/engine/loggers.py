"""Where metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases, as sinks of the one
:class:`~simsiam_kit.engine.hooks.MetricsWriter`, so every destination receives the same records (loss,
collapse std and std x sqrt(d), lr, images/s, kNN and online-probe accuracy; evaluation metrics).

* TensorBoard (``pip install tensorboard``, or the ``log`` extra): on by default where installed
  (``log.tensorboard``: null/auto), event files in ``RUN/tensorboard`` (evaluations in
  ``RUN/eval/<kind>/tensorboard``), so ``tensorboard --logdir runs/`` shows a run and its evaluations
  side by side. Scalars are named ``step/<key>`` and ``epoch/<key>``.
* Weights & Biases (``pip install wandb``): only when asked (``log.wandb=true``); ``WANDB_MODE=offline``
  works without a network. The import is lazy, and a missing package is one clear error.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import os_error_behind

SKIP_KEYS = ("type", "epoch", "step")


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes its event file from a thread of its own. A write that fails there (a full disk)
    printed that thread's traceback; TensorBoard keeps the error and raises it again at the next write, flush
    or close in the calling thread, where :class:`TensorBoardSink` makes it one line naming the directory.
    So the thread's own report of an ``OSError`` is left out (only for TensorBoard's writer thread)."""
    global _TB_QUIET
    if _TB_QUIET:
        return
    previous = threading.excepthook

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    threading.excepthook = hook
    _TB_QUIET = True


_TB_QUIET = False


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_thread()
        self.logdir = Path(logdir)
        self.closed = False
        with self._errors():
            self.writer = SummaryWriter(log_dir=str(self.logdir))

    @contextmanager
    def _errors(self):
        """A failed write (here or, raised again here, in TensorBoard's writer thread) is one line naming the
        directory."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:
            ose = os_error_behind(e)
            if ose is None:
                raise
            raise UserError(f"cannot write TensorBoard events in {self.logdir}: {ose.strerror or ose}") from None

    def scalars(self, rec: dict) -> None:
        kind, step = rec.get("type", "step"), int(rec.get("step", 0))
        with self._errors():
            for k, v in rec.items():
                if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.writer.add_scalar(f"{kind}/{k}", float(v), step)

    def image(self, tag: str, img: np.ndarray, step: int = 0) -> None:
        """``img``: uint8 (H, W, 3)."""
        with self._errors():
            self.writer.add_image(tag, img, step, dataformats="HWC")

    def flush(self) -> None:
        with self._errors():
            self.writer.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._errors():
            self.writer.flush()
            self.writer.close()


class WandbSink:
    def __init__(self, directory: Path, project: str, name: str, config: Optional[dict] = None):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "log.wandb=true needs the wandb package (pip install wandb; WANDB_MODE=offline logs without a network)"
            ) from None
        self.wandb = wandb
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(directory), config=config or {})

    def scalars(self, rec: dict) -> None:
        kind = rec.get("type", "step")
        data = {
            f"{kind}/{k}": float(v)
            for k, v in rec.items()
            if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.run.log(data, step=int(rec.get("step", 0)))

    def image(self, tag: str, img: np.ndarray, step: int = 0) -> None:
        self.run.log({tag: self.wandb.Image(img)}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def make_sinks(
    logdir: Path,
    tensorboard: Optional[bool] = None,
    wandb: bool = False,
    wandb_project: str = "simsiam-kit",
    name: str = "run",
    config: Optional[dict] = None,
) -> list:
    """The sinks a run asked for: TensorBoard when ``tensorboard`` is true, or None (auto) and installed."""
    sinks: list = []
    if tensorboard or (tensorboard is None and tensorboard_available()):
        if not tensorboard_available():
            raise UserError(
                "log.tensorboard=true needs the tensorboard package (pip install tensorboard, or the 'log' extra)"
            )
        sinks.append(TensorBoardSink(Path(logdir) / "tensorboard"))
    if wandb:
        sinks.append(WandbSink(Path(logdir), wandb_project, name, config))
    return sinks


def close_all(sinks: Sequence, quiet: bool = False) -> None:
    """Close every sink. ``quiet``: an error while closing is dropped (another error is already on its way,
    and it is the one to report); else the first one is raised after every sink has been closed."""
    first = None
    for s in sinks:
        try:
            s.close()
        except Exception as e:
            first = first or e
    if first is not None and not quiet:
        raise first


def tensorboard_note(tensorboard: Optional[bool] = None, turned_off_by: str = "") -> Optional[str]:
    """The line a command prints at start when TensorBoard is off, saying why (so a missing ``tensorboard/``
    folder is never a surprise); None when it is on. ``turned_off_by``: the setting that turned it off
    (``log.tensorboard=false``)."""
    if tensorboard is False:
        return f"note: TensorBoard is off ({turned_off_by or 'turned off'}); metrics.jsonl has every record"
    if not tensorboard_available():
        return (
            "note: TensorBoard is off: the tensorboard package is not installed (pip install -e '.[log]' turns it "
            "on); metrics.jsonl and results.json have every record"
        )
    return None


@contextmanager
def closing_all(sinks: Sequence):
    """Close every sink when the block ends, however it ends (an error of the block wins over one of closing)."""
    try:
        yield sinks
    except BaseException:
        close_all(sinks, quiet=True)
        raise
    close_all(sinks)


def png_to_array(path: Path) -> np.ndarray:
    from PIL import Image

    from simsiam_kit.data.datasets import to_rgb

    with Image.open(path) as im:
        return np.asarray(to_rgb(im))


def log_images(sinks: Sequence, images: dict, step: int = 0) -> None:
    for s in sinks:
        for tag, img in images.items():
            s.image(tag, img, step)


def view_pairs_grid(images, augment, mean, std, n: int = 8, seed: int = 0) -> np.ndarray:
    """Two augmented views of the first ``n`` images side by side (rows: image, view 1, view 2) as uint8
    (H, W, 3). Uses its own seeded generator: the training streams are not touched."""
    import torch

    x = torch.as_tensor(images[:n]).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    v1, v2 = augment(x, g), augment(x, g)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    v1, v2 = ((v * s + m).clamp(0, 1) for v in (v1, v2))
    size = v1.shape[-1]
    orig = torch.nn.functional.interpolate(
        x.float() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    rows = [torch.cat(list(t), dim=2) for t in (orig, v1, v2)]  # (3, S, n*S) each
    grid = torch.cat(rows, dim=1)  # (3, 3S, nS)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
