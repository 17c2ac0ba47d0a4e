"""Subcommands other than ``pretrain``, one module per feature area. Each module has
``register(app, eval_app, export_app, user_errors)`` and keeps its heavy imports inside the command
bodies so ``simsiam-kit --help`` stays instant."""

from importlib import import_module

MODULES = ("knn", "linear", "detection", "onnx")


def register_all(app, eval_app, export_app, user_errors) -> None:
    for name in MODULES:
        import_module(f"simsiam_kit.commands.{name}").register(app, eval_app, export_app, user_errors)
