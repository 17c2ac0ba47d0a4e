from simsiam_kit.data.datasets import ImageDataset, load_dataset, parse_spec, to_rgb

__all__ = ["ImageDataset", "load_dataset", "parse_spec", "to_rgb"]
