"""Repository hygiene a reader relies on: nothing we ship points at a file outside this repository."""

import subprocess

from conftest import ROOT

EXTERNAL = ("methods.md", "ecosystem.md", "stack-on-cpu.md", "lab-copy-detection.md", "lab-memorization-cpu.md",
            "shared/reference", "shared/seeds")


def test_no_tracked_file_cites_a_file_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if not f.endswith((".py", ".md", ".sh", ".yaml", ".toml", ".txt")) or f == "tests/test_repo.py":
            continue
        text = (ROOT / f).read_text(errors="ignore")
        hits += [f"{f}: {name}" for name in EXTERNAL if name in text]
    assert not hits, hits
