"""The repository's text stands on its own: no pointers to documents or trackers a user of it cannot open."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".toml"}
# A specification document by name or section sign, or an issue tracker's number.
POINTERS = re.compile(r"\bSPEC\b|§|\b[Ii]ssues? #?\d+")


def _text_files():
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") and part != ".ci" for part in parts) or "__pycache__" in parts:
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or parts[:1] == (".ci",)):
            yield path


def test_no_pointers_to_outside_documents():
    found = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if POINTERS.search(line) and path.name != "test_repository_text.py":
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "repository text points outside the repository:\n" + "\n".join(found)
