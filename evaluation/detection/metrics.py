"""COCO box metrics through pycocotools (the same numbers detectron2's COCOEvaluator reports).

Values are percentages (AP 0..100), as detectron2 prints them. Per-class AP is averaged over IoU
0.50:0.95 with area "all" and 100 detections, from ``COCOeval.eval["precision"]``; a class with no
ground truth in the evaluation set has no AP (``None``).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np

from simsiam_kit.errors import require_extra

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_evaluate(gt: dict, detections: list) -> dict:
    """``gt``: COCO dict; ``detections``: ``[{image_id, category_id, bbox [x,y,w,h], score}]``.

    Returns ``{"AP": .., "AP50": .., ..., "per_class": {name: AP or None}, "num_detections": n}``.
    """
    require_extra("pycocotools", "cpu")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    gt_cats = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    if not detections:
        per_class = {c["name"]: (0.0 if c["id"] in gt_cats else None) for c in cats}
        return {**{k: 0.0 for k in METRIC_KEYS}, "per_class": per_class, "num_detections": 0}
    with contextlib.redirect_stdout(quiet):
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    res = {k: _pct(ev.stats[i]) for i, k in enumerate(METRIC_KEYS)}
    precision = ev.eval["precision"]  # (iou, recall, class, area, maxdets)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        name = next(c["name"] for c in cats if c["id"] == cid)
        if cid not in gt_cats:
            per_class[name] = None
            continue
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(np.mean(p) * 100) if p.size else 0.0
    res["per_class"] = per_class
    res["num_detections"] = len(detections)
    return res


def _pct(v: float) -> float:
    v = float(v)
    return 0.0 if v < 0 or math.isnan(v) else v * 100.0  # pycocotools uses -1 for "no ground truth"


def _cell(v) -> str:
    """One table cell: a number with two decimals, ``-`` for a metric that is absent, null or NaN."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return f"{'-':>6}"
    return f"{'-':>6}" if math.isnan(v) else f"{v:6.2f}"


METRIC_NAMES = {
    "coco": "COCO AP",
    "voc2007_11point": "VOC2007 11-point AP (PascalVOCDetectionEvaluator)",
    "voc_area": "VOC area-under-curve AP (PascalVOCDetectionEvaluator)",
}


def format_results(res: dict, top_classes: int = 10) -> str:
    """The AP table (box AP, and mask AP under it when ``res`` has ``segm``) and the best classes, as text.

    Columns are the metrics ``res`` carries (VOC results have AP, AP50, AP75 only); a metric stored as
    null or NaN prints as ``-`` rather than failing."""
    keys = [k for k in METRIC_KEYS if k in res] or list(METRIC_KEYS)
    segm = res.get("segm") if isinstance(res.get("segm"), dict) else None
    label = " " * 6 + " | " if segm else ""
    head = "| " + label + " | ".join(f"{k:>6}" for k in keys) + " |"
    sep = "|" + ("--------|" if segm else "") + "|".join("-" * 8 for _ in keys) + "|"
    rows = ["| " + (f"{'box':>6} | " if segm else "") + " | ".join(_cell(res.get(k)) for k in keys) + " |"]
    if segm:
        rows.append(f"| {'mask':>6} | " + " | ".join(_cell(segm.get(k)) for k in keys) + " |")
    lines = []
    if res.get("engine"):
        lines.append(
            f"{res['engine']} engine, {res.get('iters', '?')} iterations, weights {res.get('weights', '?')}"
            + (f"; {METRIC_NAMES.get(res['metric'], res['metric'])}" if res.get("metric") else "")
        )
    lines += [head, sep, *rows]
    pc = {k: float(v) for k, v in (res.get("per_class") or {}).items() if _cell(v).strip() != "-"}
    if pc:
        best = sorted(pc.items(), key=lambda kv: -kv[1])[:top_classes]
        lines.append(
            f"per-class AP ({len(pc)} classes with boxes; top {len(best)}): "
            + ", ".join(f"{n} {v:.1f}" for n, v in best)
        )
    return "\n".join(lines)


def to_coco_detections(image_id: int, boxes_xyxy, scores, labels, label_to_cat_id: dict) -> list:
    out = []
    for b, s, l in zip(
        np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores).reshape(-1),
        np.asarray(labels).reshape(-1),
    ):
        x1, y1, x2, y2 = (float(v) for v in b)
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_cat_id[int(l)]),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": float(s),
            }
        )
    return out
