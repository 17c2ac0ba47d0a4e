"""``simsiam-kit export <format>``: one command per format of the export family (:mod:`simsiam_kit.export`),
each parsing its flags and calling that format's library function.

* ``export onnx``: :func:`simsiam_kit.export.onnx.export_onnx` (graph + metadata + parity check, int8);
* ``export detectron2``: :func:`simsiam_kit.export.detectron2.export_detectron2` (a ``.pkl`` for detectron2);
* ``export torchvision`` / ``export timm``: :func:`simsiam_kit.export.state_dict.export_state_dict` (a
  ``.safetensors`` or ``.pth`` state dict + a JSON sidecar).

A new format: its module in ``export/`` and one command here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsiam_kit.cli.common import user_errors
from simsiam_kit.cli.options import new_app, precheck
from simsiam_kit.export.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    MIN_CALIBRATION_IMAGES,
    check_options,
)

app = new_app(
    help="Export weights: ONNX encoders, Detectron2 checkpoints, torchvision/timm state dicts.", no_args_is_help=True
)


@app.command("onnx")
@user_errors
def export_onnx_cmd(
    weights: str = typer.Option(
        ...,
        "--weights",
        "-w",
        help="Run directory, checkpoint, backbone.pt, ResNet state dict, or 'random' (random init; needs --arch).",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="ONNX file to write (the parity report goes to <stem>.export.json)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --output file (without it the command stops before any work)."
    ),
    head: str = typer.Option(
        "backbone", "--head", help="backbone (pooled features) or projector (z; needs a full checkpoint)."
    ),
    image_size: Optional[int] = typer.Option(
        None,
        "--image-size",
        help="Input size (default: the size stored with the weights, else the run's config, "
        "else 32 for the CIFAR stem, 224 for the ImageNet stem).",
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18-23)."),
    fp16: bool = typer.Option(
        False, "--fp16", help="float16 weights and arithmetic (I/O stays float32); parity: cosine >= 0.999."
    ),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for a plain state dict or --weights random."),
    parity_data: str = typer.Option(
        "demo:val[:16]", "--parity-data", help="Real images for the parity check (dataset spec)."
    ),
    device: str = typer.Option("auto", "--device", help="onnxruntime device for the parity check: auto, cpu or cuda."),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="int8: static quantization (onnxruntime, QDQ: int8 weights, uint8 activations) of the checked "
        "fp32 graph, calibrated on --calibration-data; the int8 model must keep kNN top-1 within 0.5 points "
        "of fp32 on --accuracy-data or it is not written.",
    ),
    calibration_data: Optional[str] = typer.Option(
        None,
        "--calibration-data",
        help="With --quantize: your images to set the int8 ranges (dataset spec; --calibration-images of "
        "them, evenly spaced).",
    ),
    calibration_images: int = typer.Option(
        DEFAULT_CALIBRATION_IMAGES,
        "--calibration-images",
        help=f"With --quantize: images taken from --calibration-data (at least {MIN_CALIBRATION_IMAGES}).",
    ),
    calibration_method: str = typer.Option(
        DEFAULT_CALIBRATION_METHOD, "--calibration-method", help="With --quantize: minmax or percentile (99.999)."
    ),
    accuracy_data: Optional[str] = typer.Option(
        None,
        "--accuracy-data",
        help="With --quantize: labelled images (dataset spec) for the accuracy check: kNN top-1 (k=200, T=0.1) "
        "of int8 vs fp32 embeddings, two-fold (even rows are the bank of odd rows and back); 1,000+ images.",
    ),
):
    """Export the encoder to ONNX (dynamic batch, preprocessing in metadata_props) and check it against PyTorch."""
    from simsiam_kit.cli.options import check_writable
    from simsiam_kit.errors import UserError, require_extra

    check_options(quantize, fp16, calibration_data, accuracy_data, calibration_images, calibration_method)
    check_writable("--output", output)
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} exists; --overwrite replaces it (or choose another file)")
    require_extra(
        "onnxruntime", "cpu"
    )  # the parity check runs the model in it: found missing now, not after the export
    specs = [("--parity-data", parity_data)]
    if quantize:  # check_options has made sure both are given
        given = (("--calibration-data", calibration_data), ("--accuracy-data", accuracy_data))
        specs += [(option, spec) for option, spec in given if spec is not None]
    precheck(weights, None, specs, image_size=image_size)
    from simsiam_kit.export.onnx import OnnxExportOptions, export_onnx

    options = OnnxExportOptions(
        head=head,
        image_size=image_size,
        opset=opset,
        fp16=fp16,
        arch=arch,
        parity_data=parity_data,
        device=device,
        quantize=quantize,
        calibration_data=calibration_data,
        calibration_images=calibration_images,
        calibration_method=calibration_method,
        accuracy_data=accuracy_data,
    )
    export_onnx(weights, output, options, log=typer.echo)


@app.command("detectron2")
@user_errors
def export_detectron2_cmd(
    weights: str = typer.Option(
        ..., "--weights", "-w", help="Run directory, checkpoint, backbone.pt or ResNet state dict."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Detectron2 checkpoint to write (.pkl)."),
):
    """Convert a ResNet backbone (ImageNet stem) to a Detectron2 .pkl (MODEL.WEIGHTS), listing keys left out."""
    from simsiam_kit.cli.options import check_writable

    check_writable("--output", output)
    precheck(weights)
    from simsiam_kit.export.detectron2 import export_detectron2

    counters = []

    def log(line: str) -> None:  # BatchNorm step counters are many and all alike: one line for them all
        if line.strip().endswith("num_batches_tracked  (BatchNorm step counter, unused by detectron2)"):
            counters.append(line.strip().split()[0])
        else:
            typer.echo(line)

    export_detectron2(weights, output, log=log)
    if counters:
        typer.echo(f"  {len(counters)} x *.num_batches_tracked  (BatchNorm step counters, unused by detectron2)")


def _state_dict_cmd(target: str):
    def command(
        weights: str = typer.Option(
            ...,
            "--weights",
            "-w",
            help="Run directory, checkpoint, backbone.pt or another project's checkpoint (FILE#NAME picks a copy).",
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", help="File to write: .safetensors or .pth (the sidecar goes to <stem>.json)."
        ),
        image_size: Optional[int] = typer.Option(
            None, "--image-size", help="Image size recorded in the sidecar (default: as for export onnx)."
        ),
    ):
        from simsiam_kit.cli.options import check_writable

        check_writable("--output", output)
        precheck(weights, image_size=image_size)
        from simsiam_kit.export.state_dict import export_state_dict

        export_state_dict(weights, output, target, image_size=image_size, log=typer.echo)

    command.__doc__ = (
        f"Write the backbone as a {target} state dict (strict load; fc removed) with a JSON sidecar "
        "(arch, stem, image size, mean/std, resize rule, source, how to load it)."
    )
    return user_errors(command)


app.command("torchvision")(_state_dict_cmd("torchvision"))
app.command("timm")(_state_dict_cmd("timm"))
