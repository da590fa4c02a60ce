"""tools/plant_bugs.py refuses to run when a planted bug's snippet no longer matches the code exactly once."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "plant_bugs.py"


@pytest.fixture(scope="module")
def plant_bugs():
    spec = importlib.util.spec_from_file_location("plant_bugs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drifted_snippets_are_named(plant_bugs, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\ny = x + 1\nz = x + 1\n")

    def bug(name, original, replacement="x = 2\n", path="pkg/mod.py"):
        return plant_bugs.Bug(name, path, original, replacement, "", ("tests",))

    bugs = [
        bug("fine", "x = 1\n"),
        bug("gone", "x = 3\n"),
        bug("twice", "x + 1"),
        bug("broken", "x = 1\n", "x = (\n"),
        bug("no-file", "x = 1\n", path="pkg/other.py"),
    ]
    problems = plant_bugs.drift(bugs, tmp_path)
    assert [line.split(":")[0] for line in problems] == ["gone", "twice", "broken", "no-file"]
    assert "found 0 times" in problems[0] and "found 2 times" in problems[1] and "does not compile" in problems[2]


def test_main_stops_before_running_anything(plant_bugs, tmp_path, monkeypatch, capsys):
    (tmp_path / "mod.py").write_text("a = 1\n")
    monkeypatch.setattr(plant_bugs, "REPO", tmp_path)
    monkeypatch.setattr(plant_bugs, "BUGS", [plant_bugs.Bug("gone", "mod.py", "b = 1", "b = 2", "", ("t",))])
    monkeypatch.setattr(plant_bugs, "copy_repository", lambda destination: pytest.fail("copied despite drift"))
    assert plant_bugs.main([]) == 2
    assert "gone: snippet found 0 times in mod.py" in capsys.readouterr().err


def test_every_planted_bug_has_a_unique_name_and_a_test_selection(plant_bugs):
    names = [bug.name for bug in plant_bugs.BUGS]
    assert len(names) == len(set(names))
    for bug in plant_bugs.BUGS:
        assert bug.tests and all((TOOL.parents[1] / arg).exists() for arg in bug.tests if arg.startswith("tests/"))


def test_every_snippet_still_matches_the_code(plant_bugs):
    """The tool stays runnable: a change to the code a planted bug targets updates that bug too."""
    assert plant_bugs.drift(plant_bugs.BUGS) == []
