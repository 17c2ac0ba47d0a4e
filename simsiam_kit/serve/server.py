"""Run the service: open the embedding directory and the model once, build the app, serve it on uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from simsiam_kit.errors import UserError, require_extra
from simsiam_kit.serve.app import ServeSettings

#: the hosts that keep the service on this machine; anything else exposes an unauthenticated service
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_serve_extra() -> None:
    """FastAPI, uvicorn and python-multipart, or one message naming the extra to install."""
    for module in ("fastapi", "uvicorn", "python_multipart"):
        require_extra(module, "serve")


def build_app(
    index_dir, open_embedder: Callable[[Path], object], model=None, settings: ServeSettings = ServeSettings()
):
    """The app for an embedding directory: the gallery opened once, the model (``model``, else the one the
    manifest records) opened once with ``open_embedder(path)``."""
    from simsiam_kit.retrieval.gallery import Gallery
    from simsiam_kit.serve.app import create_app

    require_serve_extra()
    settings.check()
    gallery = Gallery.open(index_dir)
    path = Path(model).expanduser() if model else gallery.model
    if path is None or not path.is_file():
        raise UserError(f"model {path} (recorded in {gallery.dir / 'embed.json'}) not found; pass --model FILE.onnx")
    return create_app(gallery, open_embedder(path), settings)


def run_server(
    index_dir,
    open_embedder: Callable[[Path], object],
    model=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    log: Optional[Callable[[str], None]] = None,
) -> None:
    """Serve ``index_dir`` until interrupted (see :func:`build_app`)."""
    say = log or (lambda s: None)
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    app = build_app(index_dir, open_embedder, model, settings)
    import uvicorn

    g = app.state.gallery
    info = g.info()
    recall = f", measured recall {info['recall']:.3f}" if info["recall"] is not None else ""
    say(
        f"serving {g.count} images of {g.dir} ({info['kind']} index{'' if info['exact'] else ', approximate'}"
        f"{recall}; batching {'on' if settings.batching else 'off'}) at http://{host}:{port}/ (API: /docs)"
    )
    if host not in LOOPBACK:
        say(
            f"warning: --host {host} exposes the service beyond this machine; it has no authentication "
            "(put a reverse proxy with TLS and access control in front)"
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=5,
        limit_concurrency=256,  # more open requests than this get 503 instead of queueing without bound
        server_header=False,
    )
    uvicorn.Server(config).run()
