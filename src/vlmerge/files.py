"""What a command may do to files: atomic writes, outputs that never clobber an input, paths that stay
inside their folder, one writer per run folder, and temp folders a killed run leaves behind.

Every command goes through these so that the rules hold everywhere:

* :func:`atomic_write_bytes` / :func:`make_temp_dir` -- write beside the target, then ``os.replace``; files
  and folders get the permissions the umask gives (``mkstemp`` / ``mkdtemp`` alone give 0600 / 0700).
* :func:`guard_output_dir` / :func:`guard_output_file` -- before any output is opened: refuse an output that
  is, contains, or lies inside something the command reads, and an existing output without ``overwrite``.
* :func:`resolve_inside` -- a relative path read from a file (shard index, ``latest.json``) must name
  something inside the folder it came from; absolute paths and ``..`` escapes are refused without
  touching the path (the error says nothing about whether it exists).
* :class:`RunLock` -- an advisory ``flock`` on a run folder: a second writer fails at once.
* :func:`clean_stale_temps` -- temp folders of an earlier killed run on the same output (named with the
  writer's pid) are removed, or restored when they hold the only copy of the previous output.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

_UMASK_LOCK = threading.Lock()


class RunLocked(OSError):
    """Another process holds the run folder's lock (an environment failure: exit code 1)."""


# --------------------------------------------------------------------------------------------- permissions
def umask() -> int:
    """The process umask (read by setting and restoring it; serialised across threads)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would: 0666 / 0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


# ----------------------------------------------------------------------------------------------- atomic IO
def temp_prefix(target: PathLike, kind: str = "tmp") -> str:
    """``.{name}.{kind}-{pid}-``: hidden, tied to its target and to the process that made it."""
    return f".{Path(target).name}.{kind}-{os.getpid()}-"


def make_temp_file(target: PathLike) -> tuple[int, Path]:
    """An open temp file (fd, path) beside ``target`` with umask permissions."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, Path(tmp)


def make_temp_dir(target: PathLike, kind: str = "tmp") -> Path:
    """A temp folder beside ``target`` (same file system, so it can be renamed into place)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target, kind)))
    apply_umask(tmp, directory=True)
    return tmp


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ output guards
def _real(p: PathLike) -> Path:
    try:
        return Path(p).expanduser().absolute().resolve()
    except RuntimeError:  # Python < 3.13 raises RuntimeError("Symlink loop from ...") instead of OSError(ELOOP)
        raise ValueError(f"{p}: a loop of symbolic links; give a path that resolves") from None


def check_output_path(out: PathLike, flag: str) -> None:
    """An output path must be given (``""`` would be the working directory) and must not be the working
    directory or a folder above it (replacing it would delete what the user is working in)."""
    if not str(out).strip():
        raise ValueError(f"{flag}: empty path; give the output's path")
    real, cwd = _real(out), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"{flag} {out} is the working directory or holds it; write to a new path")
    for above in Path(out).absolute().parents:  # "File exists" / "Not a directory" would not say which
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{flag} {out}: {above} is a file, not a folder; give a path inside a folder")
            break


def _overlap(out: Path, reads: Iterable[PathLike | None], flag: str) -> None:
    for r in reads:
        if r is None:
            continue
        src = _real(r)
        if src == out:
            raise ValueError(f"{flag} {out} is also an input ({r}); write to a new path")
        if out in src.parents:
            raise ValueError(f"{flag} {out} contains the input {r}; replacing it would delete the input")
        if src in out.parents and src.is_dir():
            raise ValueError(f"{flag} {out} lies inside the input {r}; write it outside the input's folder")


#: Files of a model folder (what every command that writes one leaves): only such a folder is replaced by
#: ``--overwrite``; a folder without any is someone else's (notes, a dataset, a home directory).
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def guard_output_dir(
    out: PathLike, reads: Iterable[PathLike | None], overwrite: bool, flag: str = "output",
    clean_stale: bool = False,
) -> Path:
    """Check a directory output before anything is opened; returns it absolute (not resolved).

    Refused (``ValueError`` naming ``flag``): the output is, contains or lies inside any path in ``reads``;
    it exists and is not a directory; it exists, is not empty and ``overwrite`` is False; it is not empty and
    holds none of :data:`MODEL_MARKERS` (even with ``overwrite``). With
    ``clean_stale``, temps of an earlier killed writer of this output are cleaned up first (after the
    overlap check), so a previous output they held is restored and then counts as existing.
    """
    check_output_path(out, flag)
    path = Path(out).expanduser().absolute()
    _overlap(_real(path), list(reads), flag)
    if clean_stale:
        clean_stale_temps(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise ValueError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it")
        if any(path.iterdir()) and not any((path / m).is_file() for m in MODEL_MARKERS):
            raise ValueError(f"{flag} {path} is not empty and holds no model (no {' / '.join(MODEL_MARKERS)}); "
                             "--overwrite replaces only an earlier output, not someone else's folder: give a new "
                             "or empty directory")
    return path


def guard_output_file(
    out: PathLike, reads: Iterable[PathLike | None], overwrite: bool, flag: str = "output"
) -> Path:
    """Check a file output before anything is opened; returns it absolute.

    Refused: it is any path in ``reads`` (or a file inside a read folder, or a folder holding one); it exists
    as a directory; it exists and ``overwrite`` is False.
    """
    check_output_path(out, flag)
    path = Path(out).expanduser().absolute()
    real = _real(path)
    for r in reads:
        if r is None:
            continue
        src = _real(r)
        if src == real or real in src.parents or (src.is_dir() and src in real.parents):
            raise ValueError(f"{flag} {path} would overwrite or lie inside the input {r}; write to a new path")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; expected a file path")
    if path.exists() and not path.is_file():  # a FIFO, socket or device: replacing it is never what was meant
        raise ValueError(f"{flag} {path} exists and is not a regular file (a FIFO, socket or device); write to a "
                         "new path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it")
    return path


def resolve_inside(root: PathLike, rel: Any, what: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root``; ``ValueError`` otherwise.

    Checked on the strings and the resolved path before anything at the path is opened or stat'ed
    (beyond resolving symlinks of ``root``'s own components).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{what}: expected a relative file name, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise ValueError(f"{what}: {rel!r} is an absolute path; expected a name inside {root}")
    base = _real(root)
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{what}: {rel!r} points outside {root}")
    return Path(root) / rel


def relative_name(root: PathLike, rel: str, what: str) -> Path:
    """``root / rel`` for a file name read from a dataset's own index (a Karpathy ``filename``, an NLVR2
    ``directory``): relative and free of ``..``, checked on the string alone, so a folder inside ``root`` that
    is a symlink to the real images still works; ``ValueError`` naming ``what`` otherwise."""
    parts = Path(rel).parts
    if not rel or "\x00" in rel or os.path.isabs(rel) or rel.startswith("~") or ".." in parts:
        raise ValueError(f"{what}: {rel!r} is not a file name inside {root} (absolute, '..' or empty); the "
                         "dataset index may only name files under its root")
    return Path(root) / rel


def check_run_folder(out: PathLike, marker: str, what: str, flag: str = "--out") -> Path:
    """A folder a run writes into and resumes from: a new or empty folder, or one holding ``marker`` (the
    entry that run kind leaves, e.g. a study's ``cells``). Anything else is someone else's folder."""
    check_output_path(out, flag)
    path = Path(out).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"{flag} {path} exists and is not a directory")
        if any(path.iterdir()) and not (path / marker).exists():
            raise ValueError(f"{flag} {path} is not empty and holds no {what} (no {marker}); give a new or empty "
                             "directory")
    return path


# ---------------------------------------------------------------------------------------------- run locks
class RunLock:
    """Advisory exclusive lock on a folder (``flock`` on the folder itself: no lock file is left).

    >>> with RunLock(run_dir):   # raises RunLocked at once if another process holds it
    ...     train()
    """

    def __init__(self, folder: PathLike, what: str = "run folder") -> None:
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RunLocked(f"{self.folder}: another vlmerge process is writing this {self.what}") from None
        return self

    def __exit__(self, *_: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextmanager
def locked_run_folder(out: PathLike, what: str) -> Iterator[Path]:
    """Create ``out`` (with its parents) if needed and hold a :class:`RunLock` on it for the ``with`` body; a
    folder this call created is removed again when the body leaves it empty (a run refused or failed before it
    wrote anything leaves no trace)."""
    path = Path(out)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(path, what):
            yield path
    finally:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


# -------------------------------------------------------------------------------------------- stale temps
# Exactly what make_temp_dir / make_temp_file create: ".{name}.{kind}-{pid}-" + tempfile's 8 random characters
# (+ ".tmp" for files). Anything else -- a user's ".x.old-2024" -- is never touched.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]{8}(?:\.tmp)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: PathLike, quiet: bool = False) -> list[Path]:
    """Remove the temp folders / files an earlier, killed writer of ``target`` left beside it.

    A temp is stale when the pid in its name is not running; only names exactly as vlmerge makes them
    count (pid and tempfile's random suffix). A stale ``.old-`` folder that holds the only copy of the previous output
    (the kill came between the two renames of a replace) is renamed back to ``target`` instead.
    Returns what was removed or restored; says so on stderr unless ``quiet``.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    done: list[Path] = []
    for entry in sorted(target.parent.iterdir()):
        m = _TEMP_NAME.match(entry.name)
        if not m or m["name"] != target.name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        previous = entry / "ckpt"
        if m["kind"] == "old" and previous.is_dir() and not target.exists():
            os.rename(previous, target)
            shutil.rmtree(entry, ignore_errors=True)
            action = "restored the previous output from"
        else:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            action = "removed"
        done.append(entry)
        if not quiet:
            print(f"vlmerge: {action} {entry} (left by an earlier, killed run)", file=sys.stderr)
    return done


def final_name(path: PathLike) -> str:
    """``path`` with every vlmerge temp component (``.NAME.tmp-PID-XXXXXXXX``) replaced by the ``NAME`` it is
    written for: what an error should name (the user never asked for the temp file)."""
    parts = [m["name"] if (m := _TEMP_NAME.match(part)) else part for part in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)


def publish_dir(tmp: Path, out: Path, overwrite: bool, doing: str = "writing", flag: str = "output") -> None:
    """Rename the finished temp folder ``tmp`` to ``out``. A non-empty ``out`` (allowed only with ``overwrite``)
    is first moved to ``.{name}.old-{pid}-*/ckpt``, so that a kill between the two renames leaves it where
    :func:`clean_stale_temps` restores it; ``ValueError`` when ``out`` was filled by someone else meanwhile."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"{flag} {out} was filled by someone else while {doing} (another process?); nothing "
                             "was replaced, pass --overwrite to replace it")
        old = make_temp_dir(out, "old")
        os.rename(out, old / "ckpt")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)  # replaces an empty folder in one step (POSIX rename)


@contextmanager
def staged_dir(out: Path, overwrite: bool, doing: str = "writing", flag: str = "output") -> Iterator[Path]:
    """A temp folder beside ``out`` to build an output in: renamed into place (:func:`publish_dir`) when the
    block ends, removed when it raises, so ``out`` is never half-written."""
    tmp = make_temp_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out, overwrite, doing, flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
