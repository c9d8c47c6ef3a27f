"""Repository hygiene a reader relies on: nothing we ship points at a file outside this repository."""

import subprocess
import sys

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


def test_every_package_has_an_init_and_the_public_api_resolves():
    pkgs = [p for p in (ROOT / "guard_train").rglob("*") if p.is_dir() and p.name != "__pycache__"
            and any(p.glob("*.py"))]
    assert [str(p) for p in pkgs if not (p / "__init__.py").exists()] == []
    code = ("import sys, guard_train; assert 'torch' not in sys.modules, 'import guard_train must stay light'; "
            "print(sorted(type(getattr(guard_train, n)).__name__ for n in guard_train.__all__))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


# The tracked tree travels whole to a lent GPU (64 MiB with the wheels it carries): it must stay within 40 MiB
# (docs/ARCHITECTURE.md, "Repository size"); this fails the commit that grows it past that.
TRACKED_LIMIT_MIB = 40.0


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def test_tracked_tree_does_not_grow_past_its_limit():
    size = tracked_bytes() / 2**20
    assert 1.0 < size <= TRACKED_LIMIT_MIB, f"tracked tree {size:.1f} MiB > {TRACKED_LIMIT_MIB} MiB"
