"""``simsiam-kit serve``: the search service and its web page (simsiam_kit/serve/, with export's
``OnnxEmbedder`` passed in as the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import user_errors
from simsiam_kit.cli.options import new_app

app = new_app()  # simsiam-kit serve
OPTIONS = {"max_upload_mb": "--max-upload-mb", "max_k": "--max-k", "max_wait_ms": "--batch-wait-ms"}


@app.command("serve")
@user_errors
def serve_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Directory written by `simsiam-kit embed`."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Encoder (default: the one recorded by `embed`)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind. Anything but loopback exposes a service without authentication."
    ),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest image file accepted (MiB)."),
    max_k: int = typer.Option(100, "--max-k", help="Most neighbours one request may ask for."),
    batching: bool = typer.Option(
        False,
        "--batching/--no-batching",
        help="Batch the encoder calls of requests arriving together (wait <= --batch-wait-ms); "
        "benchmarks/serve_load.py measures both.",
    ),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", help="With --batching: longest wait for a batch."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: all cores)."),
):
    """Serve nearest-neighbour search over HTTP with a web page at / (FastAPI + uvicorn; the 'serve' extra)."""
    from simsiam_kit.errors import UserError, check_number
    from simsiam_kit.serve.server import require_serve_extra

    check_number("--port", port, 0, 65535, integer=True)
    if threads is not None:
        check_number("--threads", threads, 1, integer=True)

    if not (index / "embed.json").is_file():
        raise UserError(f"--index {index}: no embed.json there (a directory written by 'simsiam-kit embed')")
    if model is not None and not model.is_file():
        raise UserError(f"--model {model}: no such file (an encoder written by 'simsiam-kit export onnx')")
    require_serve_extra()
    from simsiam_kit.export.embedder import OnnxEmbedder
    from simsiam_kit.serve.app import ServeSettings
    from simsiam_kit.serve.server import run_server

    settings = ServeSettings(
        max_upload_mb=max_upload_mb, max_k=max_k, default_k=min(10, max_k), batching=batching, max_wait_ms=batch_wait_ms
    )
    try:
        settings.check()
    except UserError as e:  # the library names its setting, the command its option
        msg = str(e)
        for name, option in OPTIONS.items():
            msg = msg.replace(f"serve setting {name}=", f"{option} ")
        raise UserError(msg) from None
    run_server(
        index,
        lambda path: OnnxEmbedder(path, device=device, threads=threads),
        model=model,
        host=host,
        port=port,
        settings=settings,
        log=typer.echo,
    )
