"""The docs must match the code and the CI script they describe."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import kharon

ROOT = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_lifecycle", ROOT / "docs" / "gen_lifecycle.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lifecycle_files_match_table() -> None:
    generator = load_generator()

    expected = generator.expected_files()

    for path, content in expected.items():
        committed = path.read_text(encoding="utf-8")
        assert committed == content, (
            f"{path.relative_to(ROOT)} is out of date with kharon.TRANSITIONS; "
            "run `python docs/gen_lifecycle.py` and commit the result"
        )


def test_lifecycle_diagram_has_every_row() -> None:
    generator = load_generator()

    diagram = generator.render_diagram(kharon.TRANSITIONS)

    for row in kharon.TRANSITIONS:
        label = f"{row['trigger']}{generator.guard(row)}"
        for source in generator.as_list(row["source"]):
            arrow = f"{generator.mermaid_node(source)} --> {generator.mermaid_node(row['dest'])} : "
            lines = [line for line in diagram.splitlines() if line.strip().startswith(arrow)]
            assert len(lines) == 1, f"no single arrow {arrow!r} in the diagram"
            assert label in lines[0], f"arrow {arrow!r} lacks the label {label!r}"


def test_lifecycle_guards_rendered() -> None:
    generator = load_generator()

    keep_row = {"trigger": "ack", "source": "running", "dest": "done", "conditions": "keep"}
    unless_row = {"trigger": "ack", "source": "running", "dest": "absent", "unless": "keep"}
    plain_row = {"trigger": "done", "source": ["pending", "running"], "dest": "done"}

    assert generator.guard(keep_row) == " [keep]"
    assert generator.guard(unless_row) == " [not keep]"
    assert generator.guard(plain_row) == ""


def test_notebooks_have_no_outputs() -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))

    for path in notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        assert notebook["nbformat"] == 4, f"{path.name} is not nbformat 4"
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [], f"{path.name} has committed outputs"
                assert cell["execution_count"] is None, f"{path.name} has an execution count"


def test_ci_runs_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

    match = re.search(r"Run the tests:\n\n```sh\n(.+?)\n```", readme)

    assert match is not None, "README.md has no ```sh block after 'Run the tests:'"
    command = match.group(1)
    assert command in ci_script.splitlines(), f".ci/run does not run the README's test command {command!r}"
