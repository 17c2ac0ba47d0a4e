"""Detection data: COCO instances JSON and Pascal VOC (VOCdevkit) loading, with validation.

Both sources load into :class:`DetectionSet`: per-image records with boxes in absolute ``xyxy`` pixels
and contiguous labels ``1..K`` (0 is the background in torchvision's detectors), plus a COCO-format
ground-truth dict that pycocotools and detectron2's ``register_coco_instances`` read. Pascal VOC is
converted to that COCO form, so both engines and the metrics see one format.

Annotation files may come from anywhere: every field the loaders use is checked for type and range
(category and image ids, file names, numeric finite boxes of positive size inside the image, ``iscrowd``
0/1, VOC's ``<size>``, ``<name>`` and ``<bndbox>``), and a bad one is one :class:`UserError` naming the
file and the entry. Files are read through :func:`simsiam_kit.utils.io.read_bytes_bounded` (regular
files only, at most :data:`MAX_ANNOTATION_BYTES`).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.utils.io import read_bytes_bounded

#: the largest annotation file read (COCO 2017's train instances JSON is under half of it)
MAX_ANNOTATION_BYTES = 2 << 30
#: how far (pixels) a box may reach past the image border (annotation tools round outwards)
BOX_TOLERANCE = 1.0

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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_box(where: str, x1: float, y1: float, x2: float, y2: float, width, height) -> None:
    """A box (absolute xyxy) must be finite, not inverted and inside the image (when its size is known)."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise UserError(f"{where}: box {[x1, y1, x2, y2]} has a non-finite coordinate")
    if x2 < x1 or y2 < y1:
        raise UserError(f"{where}: box {[x1, y1, x2, y2]} has min > max (negative width or height)")
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or (width and x2 > width + tol) or (height and y2 > height + tol):
        raise UserError(f"{where}: box {[x1, y1, x2, y2]} (xyxy) lies outside the {width}x{height} image")


def _check_coco_lists(coco: dict, json_path: Path) -> None:
    """Types of every field :func:`load_coco_json` uses, one line naming the entry."""
    seen = set()
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict):
            raise UserError(f"{json_path}: categories[{i}] is {c!r}, expected an object with 'id' and 'name'")
        if not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise UserError(f"{json_path}: categories[{i}] has 'id' {c.get('id')!r}, expected an integer")
        if not isinstance(c.get("name"), str):
            raise UserError(
                f"{json_path}: categories[{i}] (id {c['id']}) has 'name' {c.get('name')!r}, expected a string"
            )
        if c["id"] in seen:
            raise UserError(f"{json_path}: category id {c['id']} appears twice in 'categories'")
        seen.add(c["id"])
    id_types = set()
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise UserError(f"{json_path}: images[{i}] is {im!r}, expected an object")
        if "id" not in im or "file_name" not in im:
            raise UserError(f"{json_path}: images[{i}] lacks 'id' or 'file_name'")
        if not isinstance(im["id"], (int, str)) or isinstance(im["id"], bool):
            raise UserError(f"{json_path}: images[{i}] has 'id' {im['id']!r}, expected an integer")
        id_types.add(type(im["id"]))
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise UserError(f"{json_path}: images[{i}] has 'file_name' {im['file_name']!r}, expected a file name")
        for k in ("width", "height"):
            v = im.get(k)
            if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
                raise UserError(f"{json_path}: images[{i}] has '{k}' {v!r}, expected a positive number of pixels")
    if len(id_types) > 1:
        raise UserError(f"{json_path}: image ids mix integers and strings")
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict):
            raise UserError(f"{json_path}: annotations[{i}] is {a!r}, expected an object")
        where = f"{json_path}: annotation {a.get('id', f'#{i}')!r}"
        for k in ("image_id", "category_id"):
            if not isinstance(a.get(k), (int, str)) or isinstance(a.get(k), bool):
                raise UserError(f"{where} has '{k}' {a.get(k)!r}, expected an id")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise UserError(f"{where} has 'bbox' {bbox!r}, expected [x, y, w, h] numbers")
        if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd", 0), float):
            raise UserError(f"{where} has 'iscrowd' {a.get('iscrowd')!r}, expected 0 or 1")
        area = a.get("area")
        if area is not None and not (_number(area) and math.isfinite(area) and area >= 0):
            raise UserError(f"{where} has 'area' {area!r}, expected a number >= 0")


def load_coco_json(json_path: Path, images_dir: Path, name: Optional[str] = None) -> DetectionSet:
    """Load and validate a COCO instances JSON (boxes; segmentation is ignored by this loader)."""
    json_path, images_dir = Path(json_path).expanduser(), Path(images_dir).expanduser()
    if not json_path.is_file():
        raise UserError(f"annotation file not found: {json_path}")
    if not images_dir.is_dir():
        raise UserError(f"image folder not found: {images_dir}")
    try:
        coco = json.loads(read_bytes_bounded(json_path, MAX_ANNOTATION_BYTES, "annotations").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{json_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{json_path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{json_path}: invalid JSON value ({str(e)[:200]})") from None
    if not isinstance(coco, dict):
        raise UserError(f"{json_path}: expected a COCO instances object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise UserError(f"{json_path}: missing or invalid '{key}' list (expected a COCO instances JSON)")
    _check_coco_lists(coco, json_path)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    if not cats:
        raise UserError(f"{json_path}: 'categories' is empty")
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    if not coco["annotations"]:
        raise UserError(f"{json_path}: 'annotations' is empty; a detection set needs boxes")
    images = {}
    for im in coco["images"]:
        if im["id"] in images:
            raise UserError(f"{json_path}: image id {im['id']!r} appears twice in 'images'")
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
        x, y, w, h = (float(v) for v in a["bbox"])
        im = images[a["image_id"]]
        _check_box(f"{json_path}: annotation {a.get('id')}", x, y, x + w, y + h, im.get("width"), im.get("height"))
        if w == 0 or h == 0:
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
        try:
            lines = read_bytes_bounded(ids_file, MAX_ANNOTATION_BYTES, "VOC split list").decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{ids_file}: not UTF-8 text (a VOC split list has one image id per line)") from None
        for stem in [line.strip() for line in lines if line.strip()]:
            xml_path, jpg = base / "Annotations" / f"{stem}.xml", base / "JPEGImages" / f"{stem}.jpg"
            if not jpg.is_file():
                missing.append(jpg.relative_to(voc_root))
                continue
            if not xml_path.is_file():
                raise UserError(f"VOC annotation not found: {xml_path}")
            try:
                root = ET.fromstring(read_bytes_bounded(xml_path, MAX_ANNOTATION_BYTES, "VOC annotation"))
            except ET.ParseError as e:
                raise UserError(f"{xml_path}: not valid XML ({e})") from None
            w, h = (_voc_number(root, f"size/{t}", xml_path, positive=True) for t in ("width", "height"))
            w, h = int(w), int(h)
            boxes, labels, difficult = [], [], []
            for n, obj in enumerate(root.findall("object")):
                cls = _voc_text(obj, "name", xml_path, n)
                if cls not in label_of:
                    raise UserError(f"{xml_path}: unknown VOC class {cls!r}")
                if obj.find("bndbox") is None:
                    raise UserError(f"{xml_path}: object {n} ({cls}) has no <bndbox>")
                x1, y1, x2, y2 = (
                    _voc_number(obj, f"bndbox/{t}", xml_path, n) for t in ("xmin", "ymin", "xmax", "ymax")
                )
                x1, y1 = x1 - 1.0, y1 - 1.0  # 1-based inclusive -> 0-based, as detectron2's VOC loader
                _check_box(f"{xml_path}: object {n} ({cls})", x1, y1, x2, y2, w, h)
                diff = (obj.findtext("difficult") or "0").strip() or "0"
                if diff not in ("0", "1"):
                    raise UserError(f"{xml_path}: object {n} ({cls}) has <difficult> {diff!r}, expected 0 or 1")
                is_diff = int(diff)
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


def _voc_text(node, tag: str, xml_path: Path, n: Optional[int] = None) -> str:
    text = node.findtext(tag)
    if text is None or not text.strip():
        where = f"object {n} " if n is not None else ""
        raise UserError(f"{xml_path}: {where}has no <{tag.replace('/', '><')}>")
    return text.strip()


def _voc_number(node, tag: str, xml_path: Path, n: Optional[int] = None, positive: bool = False) -> float:
    text = _voc_text(node, tag, xml_path, n)
    where = f"object {n} " if n is not None else ""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or (positive and v <= 0):
        want = "a positive number" if positive else "a finite number"
        raise UserError(f"{xml_path}: {where}<{tag.replace('/', '><')}> is {text!r}, expected {want}")
    return v


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
