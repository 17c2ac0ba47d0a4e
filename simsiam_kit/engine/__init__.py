from simsiam_kit.engine.trainer import Hook, Trainer

__all__ = ["Hook", "Trainer"]
