"""The HTTP service: a FastAPI app over a :class:`~simsiam_kit.retrieval.gallery.Gallery` and an embedder.

``create_app(gallery, embedder, settings)`` builds the app; ``simsiam-kit serve`` runs it on uvicorn
(:mod:`simsiam_kit.serve.server`). The embedder is an argument (anything with ``embed(images)`` and
``dim``; the command passes ``export.OnnxEmbedder``), as for ``search``.

Endpoints (JSON unless said otherwise; every error is a 4xx JSON body ``{"detail": "<one message>"}``):

========================================  =============================================================
``GET /``                                  the web page (HTML + a little JavaScript, served from package data)
``POST /search?k=K``                       multipart field ``image`` -> its k nearest indexed images
``POST /embed``                            multipart field ``image`` -> its embedding
``GET /items/{row}/thumbnail``             a PNG thumbnail of index row ``row`` (rows only, never a path)
``GET /items/{row}/neighbours?k=K``        the k nearest images of row ``row``'s own image
``GET /healthz``                           index kind, exactness, measured recall, count, dim, model
``GET /docs``, ``GET /openapi.json``       the API, as a local page (nothing fetched from the internet) and JSON
========================================  =============================================================

Every request is bounded before work is done for it: the body by ``max_upload_mb`` (a declared
Content-Length over it is refused unread; a chunked body is cut when it passes it), one file and a few
fields per form, an image by its pixel count read from the header (a decompression bomb is refused before
decoding), ``k`` by ``max_k``, a row by the index's size. Decoding, encoding and searching run off the
event loop; with ``batching=True`` encoder calls of requests arriving together are batched
(:mod:`simsiam_kit.serve.batching`), else each request makes its own call.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, ...) at runtime
import asyncio
import html
import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from simsiam_kit.errors import UserError
from simsiam_kit.retrieval.gallery import MAX_IMAGE_PIXELS, ImageTooLarge, open_image
from simsiam_kit.serve.batching import MAX_BATCH, MAX_WAIT_MS

#: the form field that carries the image of ``POST /search`` and ``POST /embed``
FIELD = "image"
#: room for the multipart framing (boundaries, part headers, a k field) on top of the file itself
FORM_OVERHEAD = 64 * 1024
STATIC = ("index.html", "app.js", "style.css")


@dataclass(frozen=True)
class ServeSettings:
    """What a request may ask for and how requests share the encoder."""

    max_upload_mb: float = 10.0  # the largest image file accepted
    max_k: int = 100  # the most neighbours one request may ask for
    default_k: int = 10
    max_pixels: int = MAX_IMAGE_PIXELS  # width x height, read from the header before decoding
    thumbnail_px: int = 128
    thumbnail_cache: int = 512  # thumbnails kept in memory (PNG bytes)
    max_decoding: int = 4  # uploads decoded at once (each up to max_pixels x 3 bytes)
    batching: bool = False  # dynamic batching of encoder calls (opt-in until the load benchmark says it helps)
    max_wait_ms: float = MAX_WAIT_MS
    max_batch: int = MAX_BATCH

    def check(self) -> "ServeSettings":
        checks = (
            ("max_upload_mb", 0 < self.max_upload_mb <= 1024, "in (0, 1024]"),
            ("max_k", 1 <= self.max_k <= 10_000, "in [1, 10000]"),
            ("default_k", 1 <= self.default_k <= self.max_k, f"in [1, max_k={self.max_k}]"),
            ("max_pixels", 1 <= self.max_pixels <= 1 << 31, "in [1, 2^31]"),
            ("thumbnail_px", 8 <= self.thumbnail_px <= 1024, "in [8, 1024]"),
            ("max_wait_ms", 0 <= self.max_wait_ms <= 1000, "in [0, 1000]"),
            ("max_batch", 1 <= self.max_batch <= 4096, "in [1, 4096]"),
            ("max_decoding", 1 <= self.max_decoding <= 256, "in [1, 256]"),
        )
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"serve setting {name}={getattr(self, name)} must be {want}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class _BodyLimit:
    """ASGI middleware: a request body longer than ``max_bytes`` is refused with 413, unread when its
    Content-Length says so, else as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        limit = self.max_bytes
        msg = f"request body larger than the {limit / 2**20:.1f} MiB allowed (--max-upload-mb)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > limit:
                detail = msg if declared >= 0 else "malformed Content-Length header"
                resp = JSONResponse({"detail": detail}, 413 if declared >= 0 else 400, headers={"Connection": "close"})
                return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, msg)
            return message

        await self.app(scope, limited, send)


def _static_files() -> dict[str, bytes]:
    from importlib.resources import files

    root = files("simsiam_kit.serve") / "static"
    return {name: (root / name).read_bytes() for name in STATIC}


def _docs_page(openapi: dict) -> str:
    """A plain HTML page of the OpenAPI description (FastAPI's /docs loads Swagger UI from a CDN)."""
    rows = []
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(
                f"{p['name']} ({p.get('in')}{', required' if p.get('required') else ''})"
                for p in op.get("parameters", [])
            )
            body = op.get("requestBody", {}).get("content", {})
            if body:
                params = ", ".join(x for x in (params, f"body: {', '.join(body)}") if x)
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td></tr>"
            )
    info = openapi.get("info", {})
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>API: "
        f"{html.escape(info.get('title', ''))}</title><link rel='stylesheet' href='/static/style.css'></head>"
        f"<body><main><h1>{html.escape(info.get('title', ''))} API</h1>"
        f"<p>{html.escape(info.get('description', ''))}</p>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Errors are 4xx JSON "
        '<code>{"detail": "..."}</code>.</p>'
        "<table class='api'><tr><th>method</th><th>path</th><th>what</th><th>parameters</th></tr>"
        + "".join(rows)
        + "</table><p><a href='/'>back to the search page</a></p></main></body></html>"
    )


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "string", "format": "binary", "description": "an image file"}},
                }
            }
        },
    }
}


def create_app(gallery, embedder, settings: ServeSettings = ServeSettings()):
    """The FastAPI app (see the module docstring). ``gallery``: an opened
    :class:`~simsiam_kit.retrieval.gallery.Gallery`; ``embedder``: the model runtime, whose ``dim`` must be
    the index's."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from simsiam_kit.serve.batching import DirectCaller, DynamicBatcher

    settings = settings.check()
    if embedder.dim != gallery.dim:
        raise UserError(
            f"index {gallery.dir} holds {gallery.dim}-d embeddings but the model gives {embedder.dim}-d ones; "
            "serve the model that built it"
        )
    static = _static_files()
    info = gallery.info()
    model_name = getattr(getattr(embedder, "path", None), "name", None)
    if settings.batching:
        encoder: Any = DynamicBatcher(embedder.embed, settings.max_wait_ms, settings.max_batch)
    else:
        encoder = DirectCaller(embedder.embed)

    app = FastAPI(
        title="simsiam-kit search",
        description=f"Nearest-neighbour image search over {gallery.count} images ({info['kind']} index).",
        docs_url=None,
        redoc_url=None,
    )
    app.state.gallery, app.state.settings, app.state.encoder = gallery, settings, encoder
    app.add_middleware(_BodyLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD)
    app.router.add_event_handler("shutdown", encoder.close)

    # --------------------------------------------------------------------- errors: one message each
    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{where}: {e.get('msg')}"}, 422)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return JSONResponse({"detail": str(exc)}, 413 if isinstance(exc, ImageTooLarge) else 400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # logged by uvicorn; the client gets one line
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, 500)

    # --------------------------------------------------------------------- helpers
    decoding = asyncio.Semaphore(settings.max_decoding)  # bounds the memory of decoded uploads

    async def read_image(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPException(415, f"expected multipart/form-data with the image in field '{FIELD}'")
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
        except HTTPException:
            raise
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected during the upload") from None
        except Exception as e:  # the multipart parser's errors on a malformed body
            raise HTTPException(400, f"malformed multipart body ({type(e).__name__})") from None
        try:
            f = form.get(FIELD)
            if f is None or isinstance(f, str):
                raise HTTPException(400, f"no file in form field '{FIELD}'")
            data = await f.read(settings.max_upload_bytes + 1)
        finally:
            await form.close()
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"image larger than the {settings.max_upload_mb:g} MiB allowed (--max-upload-mb)")
        if not data:
            raise HTTPException(400, f"the file in form field '{FIELD}' is empty")
        async with decoding:
            return await run_in_threadpool(open_image, io.BytesIO(data), settings.max_pixels, "the uploaded file")

    async def encode(images: list) -> np.ndarray:
        if settings.batching:
            return await asyncio.wrap_future(encoder.submit(images))
        return await run_in_threadpool(encoder, images)

    async def neighbours(vec: np.ndarray, k: int) -> dict:
        sims, rows = await run_in_threadpool(gallery.search, vec, k)
        neigh = gallery.neighbours(sims[0], rows[0])
        for n in neigh:
            n["thumbnail"] = f"/items/{n['row']}/thumbnail"
        return {
            "k": min(k, gallery.count),
            "index": info,
            "approximate": not info["exact"],
            "recall": info["recall"],
            "model": model_name,
            "neighbours": neigh,
        }

    def row_or_404(row: int) -> int:
        if not 0 <= row < gallery.count:
            raise HTTPException(404, f"row {row} is not in the index (rows 0..{gallery.count - 1})")
        return row

    async def row_image(fn, row: int):
        """``fn(row)`` (the row's image or thumbnail) off the event loop; an image that cannot be read (the
        dataset moved, a file went bad) is a 404 naming why."""
        try:
            return await run_in_threadpool(fn, row_or_404(row))
        except UserError as e:
            raise HTTPException(404, str(e)) from None

    K = Query(settings.default_k, ge=1, le=settings.max_k, description=f"neighbours (1..{settings.max_k})")

    # --------------------------------------------------------------------- endpoints
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(static["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:  # a fixed set read at start-up: the request never names a file
            raise HTTPException(404, f"no static file '{name[:40]}'")
        kind = {"js": "text/javascript", "css": "text/css", "html": "text/html"}[name.rsplit(".", 1)[1]]
        return Response(static[name], media_type=f"{kind}; charset=utf-8")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/healthz", summary="Liveness, the index (kind, exact, measured recall, count, dim) and the model")
    async def healthz():
        return {
            "status": "ok",
            "index": info,
            "model": model_name,
            "batching": settings.batching,
            "encoder_calls": encoder.calls,  # requests / calls = the mean batch
            "max_k": settings.max_k,
            "max_upload_mb": settings.max_upload_mb,
        }

    @app.post("/search", summary="The k nearest indexed images of an uploaded image", openapi_extra=_UPLOAD_BODY)
    async def search(request: Request, k: int = K):
        img = await read_image(request)
        vec = await encode([img])
        out = await neighbours(vec, k)
        out["query"] = {"width": img.width, "height": img.height}
        return out

    @app.post("/embed", summary="The l2-normalised embedding of an uploaded image", openapi_extra=_UPLOAD_BODY)
    async def embed(request: Request):
        img = await read_image(request)
        vec = await encode([img])
        return {"dim": int(vec.shape[1]), "model": model_name, "embedding": [float(x) for x in vec[0]]}

    thumb = lru_cache(maxsize=settings.thumbnail_cache)(lambda row: gallery.thumbnail(row, settings.thumbnail_px))

    @app.get("/items/{row}/thumbnail", summary="A PNG thumbnail of index row `row`", response_class=Response)
    async def thumbnail(row: int):
        png = await row_image(thumb, row)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{row}/neighbours", summary="The k nearest indexed images of row `row`'s own image")
    async def item_neighbours(row: int, k: int = K):
        img = await row_image(gallery.image, row)
        out = await neighbours(await encode([img]), k)
        out["query"] = {"row": row, **gallery.item(row)}
        return out

    return app
