"""The longest functions of the library, read with ``ast`` (no import, so any revision can be measured).

    python tools/longest_functions.py                      # the working tree: simsiam_kit, evaluation, export
    python tools/longest_functions.py --rev 0a3b1a8        # a commit, read through ``git show``
    python tools/longest_functions.py --top 20 --json      # more rows, as JSON

A function's length is its lines from ``def`` (decorators excluded) to its last line, docstring and comments
included, as an editor shows it; nested functions count inside their parent and are listed on their own too.
Names are qualified by class (``KNNProtocol.run``); paths are the repository's.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

ROOTS = ("simsiam_kit", "evaluation", "export")
REPO = Path(__file__).resolve().parent.parent


def functions(source: str, path: str) -> list[dict]:
    """``{"path", "name", "line", "lines"}`` for every function and method defined in ``source``."""
    out: list[dict] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                end = child.end_lineno or child.lineno
                out.append({"path": path, "name": name, "line": child.lineno, "lines": end - child.lineno + 1})
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source, filename=path), "")
    return out


def sources(rev: str | None, roots: tuple[str, ...]) -> dict[str, str]:
    """``{path: text}`` of the .py files under ``roots``, in the working tree or at commit ``rev``."""
    if rev is None:
        return {
            str(p.relative_to(REPO)): p.read_text()
            for root in roots
            for p in sorted((REPO / root).rglob("*.py"))
            if ".venv" not in p.parts
        }
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "--", *roots],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        path: subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        for path in listing
        if path.endswith(".py")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="a git revision (default: the working tree)")
    ap.add_argument("--top", type=int, default=10, help="how many rows (default 10)")
    ap.add_argument("--roots", nargs="+", default=list(ROOTS), help="folders to read (default: the library)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    found = [f for path, text in sources(a.rev, tuple(a.roots)).items() for f in functions(text, path)]
    found.sort(key=lambda f: (-f["lines"], f["path"], f["line"]))
    over = {n: sum(f["lines"] > n for f in found) for n in (60, 100, 150)}
    if a.json:
        print(
            json.dumps({"rev": a.rev or "working tree", "functions": len(found), "over": over, "top": found[: a.top]})
        )
        return
    print(f"{a.rev or 'working tree'}: {len(found)} functions; over 60 lines: {over[60]}, over 100: {over[100]}, "
          f"over 150: {over[150]}")  # fmt: skip
    for f in found[: a.top]:
        print(f"{f['lines']:5d}  {f['path']}:{f['line']}  {f['name']}")


if __name__ == "__main__":
    main()
