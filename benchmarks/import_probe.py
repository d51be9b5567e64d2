"""Run ddp-trainer's CLI and record where each package was first imported from (file:line), as JSON.

Usage (by startup.py): python -X importtime benchmarks/import_probe.py OUT.json [ddp-train arguments...]
`-X importtime` says how long each import took; this says which line asked for it, also for imports made
inside functions (which importtime shows without a parent).
"""

from __future__ import annotations

import json
import runpy
import sys
import traceback
from pathlib import Path

# Lazily imported subpackages worth a line of their own; every other module counts under its top-level package.
SUBPACKAGES = ("torch._dynamo", "torch.utils.tensorboard", "torch.distributed")


def _short(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    for marker in ("site-packages/", "/ddp_trainer/", "/benchmarks/"):
        if marker in path:
            path = ("" if marker == "site-packages/" else marker.strip("/") + "/") + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} ({frame.name})"


def describe_importer(stack: list[traceback.FrameSummary]) -> str:
    """The import statement's location and, if that is not our code, the ddp_trainer line that led to it."""
    frames = [f for f in stack if not f.filename.startswith("<") and "importlib" not in f.filename]
    frames = [f for f in frames if not f.filename.endswith(("import_probe.py", "runpy.py"))]
    if not frames:
        return "the interpreter"
    where = _short(frames[-1])
    ours = [f for f in frames if "/ddp_trainer/" in f.filename]
    if ours and ours[-1] is not frames[-1]:
        where += f" via {_short(ours[-1])}"
    return where


def main() -> None:
    """Install the import audit hook, run `python -m ddp_trainer.train ARGS`, write the first importers."""
    out, sys.argv = Path(sys.argv[1]), ["ddp-train", *sys.argv[2:]]
    first_importer: dict[str, str] = {}

    def note_import(event: str, args: tuple) -> None:
        if event != "import":
            return
        name = args[0]
        key = name if name in SUBPACKAGES else name.partition(".")[0]
        if key not in first_importer:
            first_importer[key] = describe_importer(traceback.extract_stack()[:-1])

    sys.addaudithook(note_import)
    try:
        runpy.run_module("ddp_trainer.train", run_name="__main__", alter_sys=True)
    finally:
        out.write_text(json.dumps(first_importer))


if __name__ == "__main__":
    main()
