"""simsiam-kit: SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021)."""

__version__ = "0.1.0"
