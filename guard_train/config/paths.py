"""Where a command may write, and what it may replace.

A directory guard_train creates for a run or a command's `--out` gets a marker file (`RUN_MARKER`). Only a directory
holding that marker is ever removed (`run.overwrite=true`) or written into when it already has other files; a
user's own folder is refused with a message naming it. `run.name` must stay inside `run.output_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

RUN_MARKER = ".guard_train_run"


class PathError(ValueError):
    """An input that is missing, empty or not text, or an output that would escape its parent, replace a user's
    files, or is not a directory. The message names the path and the fix."""


def check_run_name(name: str, output_dir: str) -> None:
    """run.output_dir is a folder (or not there yet) and run.name a folder inside it: no absolute path, no `.`/`..`
    component, no escape by a symlink."""
    if output_dir and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise PathError(f"run.output_dir {output_dir!r} is an existing file; give a directory (it is created)")
    if not name:
        return
    comps = name.replace("\\", "/").split("/")
    bad = name.startswith(("/", "\\", "~")) or Path(name).is_absolute() or any(c in (".", "..") for c in comps)
    out = Path(output_dir or ".")
    if not bad:
        try:
            (out / name).resolve().relative_to(out.resolve())
            bad = (out / name).resolve() == out.resolve()
        except ValueError:  # a symlinked component points outside
            bad = True
    if bad:
        raise PathError(f"run.name={name!r} does not name a folder inside run.output_dir ({str(out)!r}): use a "
                        f"plain name such as 'my-run' (no absolute path, '.' or '..')")


def is_ours(d: Path) -> bool:
    return (Path(d) / RUN_MARKER).is_file()


def has_content(d: Path) -> bool:
    """Anything in the directory besides our marker."""
    return Path(d).is_dir() and any(p.name != RUN_MARKER for p in Path(d).iterdir())


def mark_ours(d: Path) -> Path:
    """Create the directory (if needed) and mark it as ours: run.overwrite / a later --out may replace its files."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    if not is_ours(d):
        (d / RUN_MARKER).write_text("created by guard_train; run.overwrite=true and --out may replace this directory\n")
    return d


def is_legacy_run(d: Path) -> bool:
    """A run directory written before the marker existed: its status/rank0.json is ours (state, rank, pid, step)."""
    try:
        rec = json.loads((Path(d) / "status" / "rank0.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and {"state", "rank", "pid", "step"} <= rec.keys()


def check_replaceable(d: Path, what: str) -> None:
    """Refuse to delete a directory a run of ours did not create (marker, or a run from before markers)."""
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise PathError(f"{what} {str(d)!r} is an existing file, not a run directory; move it away or pick "
                        f"another name")
    if has_content(d) and not is_ours(d) and not is_legacy_run(d):
        raise PathError(f"{what} {str(d)!r} holds files that no guard_train run created (no {RUN_MARKER} "
                        f"marker): refusing to delete it. Move it away or choose another run.name / "
                        f"run.output_dir")


def check_out_dir(path: str, flag: str = "--out", own_files: tuple[str, ...] = ()) -> Path:
    """`--out DIR` of a command: an existing file is refused, and so is a non-empty folder we did not write (no
    marker and none of the command's own outputs `own_files`, written before markers existed). Writes nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise PathError(f"{flag} {path!r} is an existing file; give a directory path (it is created)")
    if has_content(p) and not is_ours(p) and not any((p / f).exists() for f in own_files):
        raise PathError(f"{flag} {path!r} is a folder with files guard-train did not write; give a new or "
                        f"empty directory so nothing of yours is overwritten")
    return p


def read_text_input(path: str, flag: str, what: str = "a UTF-8 text file") -> str:
    """The text of an input file, refused (with the path and the fix) when missing, a folder, binary or empty."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{flag} {path!r} does not exist; give {what}")
    if not p.is_file():
        raise PathError(f"{flag} {path!r} is a directory; give {what}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PathError(f"{flag} {path!r} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                        f"give {what}") from None
    if "\x00" in text:
        raise PathError(f"{flag} {path!r} is a binary file (it holds NUL bytes); give {what}")
    if not text.strip():
        raise PathError(f"{flag} {path!r} is empty; give {what}")
    return text


def read_jsonl_input(path: str, flag: str, what: str, keys: tuple[str, ...] = ()) -> list[dict]:
    """Each line of a JSON-lines input as a dict holding `keys`; refused (path, line, fix) otherwise."""
    rows = []
    for i, line in enumerate(read_text_input(path, flag, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PathError(f"{flag} {path!r} line {i} is not JSON ({e}); give {what}") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise PathError(f"{flag} {path!r} line {i} lacks {missing}; give {what}")
        rows.append(row)
    return rows


def safetensors_problem(f: Path) -> Optional[str]:
    """Why a .safetensors file cannot be read, or None; reads only its header. The header (8 bytes of length, then
    JSON with every tensor's data offsets) must parse and the file must hold all the data it describes."""
    size = Path(f).stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated (no header)" if size else "zero bytes"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return "truncated (header longer than the file)"
        try:
            meta = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError):
            return "damaged header (not a safetensors file?)"
    if 8 + n + end > size:
        return f"truncated ({size} bytes, its header describes {8 + n + end})"
    return None


LORA_FILE = "pytorch_lora_weights.safetensors"


def check_lora_input(path: str, flag: str) -> None:
    """A LoRA given by the user: a directory holding pytorch_lora_weights.safetensors, or a .safetensors file,
    readable (pickled .bin LoRAs are refused: loading them could run code)."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{flag} {path!r} does not exist; give a LoRA directory with {LORA_FILE}")
    f = p / LORA_FILE if p.is_dir() else p
    if not f.is_file():
        raise PathError(f"{flag} {path!r} has no {LORA_FILE}; give a LoRA saved with diffusers' save_lora_weights "
                        f"(safetensors)")
    if f.suffix != ".safetensors":
        raise PathError(f"{flag} {path!r} is not a .safetensors file (pickled weights are refused: loading them could "
                        f"run code)")
    why = safetensors_problem(f)
    if why:
        raise PathError(f"{flag} {str(f)!r} cannot be read: {why}")
