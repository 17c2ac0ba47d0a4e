def register(app, eval_app, export_app, user_errors) -> None:
    """Filled in by the corresponding feature (see the issue tracker)."""
