"""One import namespace and visible layers: the wheel installs only ``simsiam_kit`` (with ``evaluation/`` as
``simsiam_kit.evaluation``, ``export/`` as ``simsiam_kit.export``, ``configs/`` as package data) and runs from
outside the source tree; imports only point down the layers of DESIGN.md."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO

FOLDERS = {"simsiam_kit": "simsiam_kit", "evaluation": "simsiam_kit.evaluation", "export": "simsiam_kit.export"}


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _sources():
    for folder in FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_every_package_folder_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {_module_name(p.parent / "__init__.py") for folder in FOLDERS for p in (REPO / folder).rglob("__init__.py")}
    assert found | {"simsiam_kit.configs"} == listed


def test_imports_point_down_the_layers():
    bad = []
    for path in _sources():
        mod = _module_name(path)
        for imp in _imports(path):
            top = imp.split(".")[0]
            if top in ("evaluation", "export"):
                bad.append(f"{mod} imports the bare name {imp}")
            in_cli = mod.startswith("simsiam_kit.cli") or mod == "simsiam_kit.__main__"  # the entry points
            is_eval, is_export = mod.startswith("simsiam_kit.evaluation"), mod.startswith("simsiam_kit.export")
            core = not (in_cli or is_eval or is_export)
            if core and (
                imp.startswith("simsiam_kit.evaluation")
                or imp.startswith("simsiam_kit.export")
                or imp.startswith("simsiam_kit.cli")
            ):
                bad.append(f"core module {mod} imports {imp}")
            if is_eval and (imp.startswith("simsiam_kit.export") or imp.startswith("simsiam_kit.cli")):
                bad.append(f"{mod} imports {imp}")
            if is_export and (imp.startswith("simsiam_kit.evaluation") or imp.startswith("simsiam_kit.cli")):
                bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(bad)


def test_help_does_not_import_torch():
    code = "import sys; from simsiam_kit.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


def test_wheel_runs_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    )
    (whl,) = wheels.glob("simsiam_kit-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "evaluation" not in tops and "export" not in tops and "configs" not in tops
    assert "simsiam_kit/configs/pretrain/demo.yaml" in names and "simsiam_kit/evaluation/knn.py" in names
    assert "simsiam_kit/configs/detection/torchvision_quick.yaml" in names and "simsiam_kit/export/embedder.py" in names
    target, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(whl)],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "2"}
    code = (
        "import simsiam_kit, simsiam_kit.export as e; from simsiam_kit.export import OnnxEmbedder; "
        "import simsiam_kit.evaluation.knn; print(simsiam_kit.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))  # the wheel's copy, not the source tree
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "simsiam_kit",
            "pretrain",
            "--output",
            str(work / "run"),
            "--set",
            "optim.epochs=1",
            "--set",
            "train.max_steps_per_epoch=2",
            "--set",
            "train.knn_every=0",
            "--set",
            "train.plots=false",
            "--set",
            "train.progress=false",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "run" / "backbone.pt").is_file() and "demo" in (work / "run" / "config.yaml").read_text()
