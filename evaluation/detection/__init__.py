"""Detection transfer: COCO-JSON / Pascal VOC data, a torchvision Faster R-CNN engine (runs anywhere), a
detectron2 engine (the paper's R50-C4 protocol), COCO metrics. The weight converter is
``export/detectron2.py``."""
