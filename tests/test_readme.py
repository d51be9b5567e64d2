"""The README's promises that code can check: CI runs its test command, its API example runs, its links to docs/
lead to files, and the configuration reference there lists every key of the schema."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from conftest import cli_env

from ddp_trainer import errors
from ddp_trainer.config import Config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"


def test_ci_runs_the_readme_test_command_and_its_lint():
    *_, test_command, lint = (REPO / ".ci" / "run").read_text().strip().splitlines()
    readme = (REPO / "README.md").read_text()
    assert test_command.endswith("-m pytest") and test_command in readme.splitlines()
    assert lint == ".venv/bin/ruff check . && .venv/bin/ruff format --check ."
    assert "Lint with `ruff check . && ruff format --check .`" in readme


def documented_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of the schema, with nested sections expanded; `kwargs` and `synthetic.*` have their own rows."""
    keys = []
    for field in dataclasses.fields(schema):
        value = getattr(schema(), field.name)
        if field.name == "synthetic" or field.name == "kwargs":
            continue
        if dataclasses.is_dataclass(value):
            keys += documented_keys(type(value), f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def table_keys(markdown: str, section: str) -> set[str]:
    """The `code` names in the first column of the table under the heading `## section`."""
    text = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| ")]
    return {name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}


def test_every_config_key_is_documented():
    documented = table_keys(CONFIGURATION.read_text(), "Keys")
    assert [key for key in documented_keys(Config) if key not in documented] == []


def test_the_python_api_example_runs_as_written(tmp_path):
    script = README.read_text().split("## The Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(script + "assert record['epoch'] == 5 and record['val/samples'] == 200\n")
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "mine" / "checkpoints" / "best.pt").exists()


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings outside code blocks: lower case, punctuation dropped, spaces as hyphens."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            anchors.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of a Markdown page whose file, or heading after `#`, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file() or (anchor and anchor not in heading_anchors(linked.read_text())):
            broken.append(f"{page.relative_to(REPO)}: {target}")
    return broken


def test_the_errors_the_readme_names_are_cli_errors_in_ddp_trainer_errors():
    text = " ".join(README.read_text().split())
    said = text.split("A diverged loss raises", 1)[1].split("each is in `ddp_trainer.errors`", 1)[0]
    names = re.findall(r"`(\w+)`", said)
    assert names == ["TrainingDiverged", "RankLost", "CheckpointWriteFailed"]
    assert all(issubclass(getattr(errors, name), errors.CliError) for name in names)


def test_the_readme_links_every_docs_page_and_only_pages_that_exist():
    linked = {target.partition("#")[0] for target in re.findall(r"\]\((docs/[^)\s]+)\)", README.read_text())}
    assert linked == {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert broken_links(README) == []


def test_links_between_docs_pages_lead_to_files_and_headings_that_exist():
    assert [link for page in sorted(DOCS.glob("*.md")) for link in broken_links(page)] == []
