"""Detection data: COCO instances JSON and Pascal VOC (VOCdevkit) loading, with validation.

Both sources load into :class:`DetectionSet`: per-image records with boxes in absolute ``xyxy`` pixels
and contiguous labels ``1..K`` (0 is the background in torchvision's detectors), plus a COCO-format
ground-truth dict that pycocotools and detectron2's ``register_coco_instances`` read. Pascal VOC is
converted to that COCO form, so both engines and the metrics see one format.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from simsiam_kit.errors import UserError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass
class DetectionSet:
    name: str
    images_dir: Path
    # dicts: image_id, file (Path), width, height, boxes (N,4 float32 xyxy), labels (N int64 1..K), iscrowd (N)
    # (1 = not trained on), and for Pascal VOC difficult (N; trained on, ignored by the evaluation)
    records: list
    categories: list  # COCO category dicts (id, name, ...), in label order: label k+1 <-> categories[k]
    coco: dict = field(repr=False, default_factory=dict)  # COCO-format ground truth (images, annotations, categories)
    json_path: Optional[Path] = None  # a COCO JSON file holding ``coco`` (written for VOC)
    dropped_boxes: int = 0  # degenerate boxes (zero width/height) skipped
    voc_splits: Optional[list] = None  # Pascal VOC: [(year, split), ...] under images_dir (the VOCdevkit)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list:
        return [c["name"] for c in self.categories]

    @property
    def label_to_cat_id(self) -> dict:
        return {i + 1: c["id"] for i, c in enumerate(self.categories)}

    @property
    def num_boxes(self) -> int:
        return int(sum(len(r["boxes"]) for r in self.records))

    def subset(self, n: int) -> "DetectionSet":
        """The first ``n`` images (ground truth restricted to them)."""
        recs = self.records[:n]
        ids = {r["image_id"] for r in recs}
        coco = dict(self.coco)
        coco["images"] = [im for im in self.coco["images"] if im["id"] in ids]
        coco["annotations"] = [a for a in self.coco["annotations"] if a["image_id"] in ids]
        return DetectionSet(
            self.name, self.images_dir, recs, self.categories, coco, None, self.dropped_boxes, self.voc_splits
        )

    def write_json(self, path: Path) -> Path:
        from simsiam_kit.evaluation.detection.outputs import write_json

        write_json(path, self.coco)
        self.json_path = Path(path)
        return self.json_path


def _names_missing(missing: list, images_dir: Path) -> str:
    shown = ", ".join(str(m) for m in missing[:5])
    return f"{len(missing)} image file(s) missing under {images_dir}: {shown}{' ...' if len(missing) > 5 else ''}"


def load_coco_json(json_path: Path, images_dir: Path, name: Optional[str] = None) -> DetectionSet:
    """Load and validate a COCO instances JSON (boxes; segmentation is ignored by this loader)."""
    json_path, images_dir = Path(json_path).expanduser(), Path(images_dir).expanduser()
    if not json_path.is_file():
        raise UserError(f"annotation file not found: {json_path}")
    if not images_dir.is_dir():
        raise UserError(f"image folder not found: {images_dir}")
    try:
        coco = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(coco, dict):
        raise UserError(f"{json_path}: expected a COCO instances object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise UserError(f"{json_path}: missing or invalid '{key}' list (expected a COCO instances JSON)")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    if not cats:
        raise UserError(f"{json_path}: 'categories' is empty")
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    if not coco["annotations"]:
        raise UserError(f"{json_path}: 'annotations' is empty; a detection set needs boxes")
    images = {}
    for im in coco["images"]:
        if "id" not in im or "file_name" not in im:
            raise UserError(f"{json_path}: an image entry lacks 'id' or 'file_name': {im}")
        images[im["id"]] = im
    missing = [im["file_name"] for im in coco["images"] if not (images_dir / im["file_name"]).is_file()]
    if missing:
        raise UserError(f"{json_path}: " + _names_missing(missing, images_dir))
    per_image: dict = {i: [] for i in images}
    dropped = 0
    for a in coco["annotations"]:
        if a.get("image_id") not in images:
            raise UserError(f"{json_path}: annotation {a.get('id')} refers to unknown image_id {a.get('image_id')}")
        if a.get("category_id") not in cat_to_label:
            raise UserError(
                f"{json_path}: annotation {a.get('id')} has category_id {a.get('category_id')}, "
                "which is not in 'categories'"
            )
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise UserError(f"{json_path}: annotation {a.get('id')} has no [x, y, w, h] 'bbox'")
        if bbox[2] <= 0 or bbox[3] <= 0:
            dropped += 1
            continue
        per_image[a["image_id"]].append(a)
    records = []
    for iid, im in images.items():
        anns = per_image[iid]
        boxes = np.array(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=np.float32,
        ).reshape(-1, 4)
        records.append(
            {
                "image_id": iid,
                "file": images_dir / im["file_name"],
                "width": im.get("width"),
                "height": im.get("height"),
                "boxes": boxes,
                "labels": np.array([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64),
                "iscrowd": np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=np.int64),
            }
        )
    # pycocotools needs 'area' and 'iscrowd' on every annotation
    coco = dict(coco)
    coco["annotations"] = [
        {**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": int(a.get("iscrowd", 0))}
        for a in coco["annotations"]
    ]
    return DetectionSet(name or json_path.stem, images_dir, records, cats, coco, json_path, dropped)


def check_same_categories(train: DetectionSet, val: DetectionSet) -> None:
    """Train and val must share the category list (ids and names), or labels would silently shift."""
    a = [(c["id"], c["name"]) for c in train.categories]
    b = [(c["id"], c["name"]) for c in val.categories]
    if a == b:
        return
    only_a = [f"{i}:{n}" for i, n in a if (i, n) not in set(b)]
    only_b = [f"{i}:{n}" for i, n in b if (i, n) not in set(a)]
    raise UserError(
        f"categories differ between {train.json_path or train.name} and {val.json_path or val.name}: "
        f"only in train: {', '.join(only_a[:8]) or '-'}; only in val: {', '.join(only_b[:8]) or '-'}"
    )


# ---------------------------------------------------------------------------------------------- VOC


def _parse_splits(spec: str, flag: str) -> list:
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if "/" not in part:
            raise UserError(f"{flag} {spec!r}: expected YEAR/SPLIT items such as 2007/trainval")
        year, split = part.split("/", 1)
        out.append((year, split))
    if not out:
        raise UserError(f"{flag} {spec!r}: no splits given")
    return out


def load_voc(voc_root: Path, splits: str, name: str = "voc", flag: str = "--voc-train") -> DetectionSet:
    """Pascal VOC from a VOCdevkit tree (``VOC{year}/ImageSets/Main/{split}.txt``, ``Annotations/``,
    ``JPEGImages/``). Boxes are converted from VOC's 1-based inclusive pixels to 0-based ``xyxy`` (as
    detectron2 does). ``difficult`` objects are handled like detectron2's ``pascal_voc`` loader and the VOC
    evaluation: they are trained on (``iscrowd`` 0 in the records, ``difficult`` 1) and ignored when scoring
    (``iscrowd=1`` in the COCO ground truth, which pycocotools skips like VOC's evaluation does)."""
    voc_root = Path(voc_root).expanduser()
    if not voc_root.is_dir():
        raise UserError(f"VOC root not found: {voc_root}")
    cats = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
    label_of = {n: i + 1 for i, n in enumerate(VOC_CLASSES)}
    images, anns, records, missing = [], [], [], []
    next_img, next_ann = 1, 1
    for year, split in _parse_splits(splits, flag):
        base = voc_root / f"VOC{year}"
        ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise UserError(f"VOC split list not found: {ids_file}")
        for stem in [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]:
            xml_path, jpg = base / "Annotations" / f"{stem}.xml", base / "JPEGImages" / f"{stem}.jpg"
            if not jpg.is_file():
                missing.append(jpg.relative_to(voc_root))
                continue
            if not xml_path.is_file():
                raise UserError(f"VOC annotation not found: {xml_path}")
            try:
                root = ET.parse(xml_path).getroot()
            except ET.ParseError as e:
                raise UserError(f"{xml_path}: not valid XML ({e})") from None
            size = root.find("size")
            w, h = int(size.find("width").text), int(size.find("height").text)
            boxes, labels, difficult = [], [], []
            for obj in root.findall("object"):
                cls = obj.find("name").text.strip()
                if cls not in label_of:
                    raise UserError(f"{xml_path}: unknown VOC class {cls!r}")
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
                x1, y1 = x1 - 1.0, y1 - 1.0  # 1-based inclusive -> 0-based, as detectron2's VOC loader
                diff = obj.find("difficult")
                is_diff = int(diff.text) if diff is not None and diff.text else 0
                boxes.append([x1, y1, x2, y2])
                labels.append(label_of[cls])
                difficult.append(is_diff)
                anns.append(
                    {
                        "id": next_ann,
                        "image_id": next_img,
                        "category_id": label_of[cls],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": is_diff,
                    }
                )
                next_ann += 1
            rel = jpg.relative_to(voc_root).as_posix()
            images.append({"id": next_img, "file_name": rel, "width": w, "height": h})
            records.append(
                {
                    "image_id": next_img,
                    "file": jpg,
                    "width": w,
                    "height": h,
                    "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.array(labels, dtype=np.int64),
                    "iscrowd": np.zeros(len(labels), dtype=np.int64),
                    "difficult": np.array(difficult, dtype=np.int64),
                }
            )
            next_img += 1
    if missing:
        raise UserError(f"VOC {splits}: " + _names_missing(missing, voc_root))
    if not anns:
        raise UserError(f"VOC {splits} under {voc_root}: no objects annotated")
    coco = {"images": images, "annotations": anns, "categories": cats}
    return DetectionSet(name, voc_root, records, cats, coco, None, 0, _parse_splits(splits, flag))


@dataclass
class DetectionData:
    train: DetectionSet
    val: DetectionSet


def resolve_data(
    train_json, train_images, val_json, val_images, voc_root, voc_train: str, voc_val: str
) -> DetectionData:
    """Build train/val sets from the CLI's COCO-JSON or VOC options, validated."""
    coco_given = any(x is not None for x in (train_json, train_images, val_json, val_images))
    if voc_root is not None:
        if coco_given:
            raise UserError("give either --voc-root or --train-json/--train-images/--val-json/--val-images, not both")
        train = load_voc(voc_root, voc_train, "voc_train", "--voc-train")
        val = load_voc(voc_root, voc_val, "voc_val", "--voc-val")
    else:
        names = {
            "--train-json": train_json,
            "--train-images": train_images,
            "--val-json": val_json,
            "--val-images": val_images,
        }
        absent = [k for k, v in names.items() if v is None]
        if absent:
            raise UserError(f"missing {', '.join(absent)} (or use --voc-root for Pascal VOC)")
        train = load_coco_json(train_json, train_images, "train")
        val = load_coco_json(val_json, val_images, "val")
    check_same_categories(train, val)
    return DetectionData(train, val)
