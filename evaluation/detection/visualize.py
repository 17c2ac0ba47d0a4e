"""PNG of predicted boxes (and ground truth) on a few validation images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simsiam_kit.utils.io import atomic_savefig


def save_predictions_png(
    records: list, predictions: list, class_names: list, path: Path, score_thresh: float = 0.5, max_images: int = 4
) -> Path:
    """``records``: DetectionSet records; ``predictions``: per record ``{"boxes" (N,4 xyxy), "scores", "labels"}``
    with labels 1..K. Predictions in red (``class score``), ground truth in dashed green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from simsiam_kit.data import to_rgb

    n = min(max_images, len(records))
    if n == 0:
        return path
    cols = min(2, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        rec, pred = records[i], predictions[i]
        ax = axes.ravel()[i]
        with Image.open(rec["file"]) as im:
            ax.imshow(np.asarray(to_rgb(im)))  # the one decoding rule (16-bit grayscale scaled)
        for b in rec["boxes"]:
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.2, ls="--"))
        keep = np.asarray(pred["scores"]) >= score_thresh
        boxes, scores, labels = (np.asarray(pred[k])[keep] for k in ("boxes", "scores", "labels"))
        for b, s, l in zip(boxes, scores, labels):
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=1.5))
            ax.text(
                b[0],
                b[1],
                f"{class_names[int(l) - 1]} {s:.2f}",
                color="white",
                fontsize=7,
                bbox=dict(facecolor="red", alpha=0.6, pad=1, lw=0),
            )
        ax.set_title(f"{Path(rec['file']).name}: {int(keep.sum())} boxes >= {score_thresh:g} (GT dashed)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=80)
    plt.close(fig)
    return path
