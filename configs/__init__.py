"""The shipped YAML configs (``pretrain/``, ``detection/``), installed as the package data
``simsiam_kit.configs`` and found with ``importlib.resources`` (see ``simsiam_kit.config.config_dirs``)."""
