"""The workspace: where datasets and runs live (datasets/NAME, workspace/RUN/...), how a path is shown to
the user, the user's-mistake error, and outputs written atomically (temporary folders renamed into place,
locks, the leftovers of killed runs cleaned by the next one)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
def datasets_dir() -> Path:
    """Where `DATASET=NAME` is looked for (datasets/NAME); `PIPELINES_DATASETS` moves it (tests use a temporary one)."""
    return Path(os.environ.get("PIPELINES_DATASETS", REPO_ROOT / "datasets"))


def workspace_dir() -> Path:
    """Where generated files go; `PIPELINES_WORKSPACE` moves it (tests use a temporary one)."""
    return Path(os.environ.get("PIPELINES_WORKSPACE", REPO_ROOT / "workspace"))


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, where: str | os.PathLike | None, message: str):
        self.where = str(where) if where is not None else None
        self.message = message
        super().__init__(f"{self.where}: {message}" if self.where else message)


def display_path(path: str | os.PathLike) -> str:
    """A path as the user should read it: relative to the working directory when it is below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_dataset(name_or_path: str) -> Path:
    """`DATASET=NAME` means `datasets/NAME`; anything else that exists is taken as a path."""
    candidates = [Path(name_or_path)]
    if not Path(name_or_path).is_absolute():
        candidates.insert(0, datasets_dir() / name_or_path)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise UserError(name_or_path, f"no such dataset: looked for {display_path(candidates[0])}"
                    + (f" and {display_path(candidates[1])}" if len(candidates) > 1 else ""))


def dataset_name(dataset_path: Path) -> str:
    """The name later stages use for a dataset: its folder name (or a file's stem)."""
    return dataset_path.stem if dataset_path.is_file() else dataset_path.name


def make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent folders; returns them innermost first (to remove on failure)."""
    created = []
    parent = Path(path).parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return created


# ------------------------------------------------------------------------- leftovers of killed runs
#
# A stage writes its output into `.NAME.tmp-PID@HOST-XXXX` beside it and renames it into place; for the
# moment of the swap the previous output is `.NAME.old-PID@HOST`. A run killed in between (kill -9, a
# closed terminal, the OOM killer) cannot clean up, so the next run of the stage does: it removes the
# leftovers whose owner is gone. The owner is told by the PID and host in the name: a folder of this
# host whose process no longer exists is a leftover; one whose process is alive belongs to a run of the
# same stage working now and is left alone. A name without a readable owner (another host sharing the
# workspace, or a version before this one) is removed only when nothing in it changed for
# LEFTOVER_AGE_S. A stage that holds a lock on its output (`output_lock`: make data, make train) removes
# all of them at once: no other run can be writing there.

LEFTOVER_AGE_S = 24 * 3600
_OWNER = re.compile(r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)(?:-|$)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "host"


def owner_tag(pid: int | None = None) -> str:
    """`PID@HOST`, as temporary names carry it (this process's by default)."""
    return f"{os.getpid() if pid is None else pid}@{_host()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (this process: yes)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill would end the process there: treat it as alive (the age decides)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def dead_process_dirs(root: Path, prefix: str) -> list[tuple[int, Path]]:
    """The folders ROOT/PREFIXPID whose process no longer runs: (pid, folder), for the clean-up of what
    killed processes left (serving workers' and training workers' temporary folders)."""
    found = []
    for folder in Path(root).glob(prefix + "*"):
        pid = folder.name[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
            found.append((int(pid), folder))
    return found


def _newest_change(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def is_leftover(path: Path, owner: str) -> bool:
    """Whether `path` (a temporary name whose owner part is `owner`, e.g. '1234@host-k3j2') was left by a
    process that is gone; see the comment above."""
    match = _OWNER.match(owner)
    if match and match["host"] == _host():
        return not pid_alive(int(match["pid"]))
    try:
        return time.time() - _newest_change(path) >= LEFTOVER_AGE_S
    except OSError:
        return False


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _human(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} kB"


def remove_leftovers(final: Path, log=print, owned: bool = False, extra: list[Path] = ()) -> list[Path]:
    """Remove what killed runs of the stage that writes `final` left beside it: `.NAME.tmp-*` (folders or
    files) and `.NAME.old-*` (the previous output, put back instead when `final` is missing: the run was
    killed between the two renames). Only leftovers of processes that are gone (`is_leftover`), or all of
    them with `owned` (the caller holds the output's lock). `extra`: more leftovers the caller found.
    Prints one line saying what went; returns the paths removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed: list[Path] = []
    size = 0
    for kind in ("tmp", "old"):
        prefix = f".{final.name}.{kind}-"
        for path in sorted(final.parent.glob(f"{glob.escape(prefix)}*")):
            if not (owned or is_leftover(path, path.name[len(prefix):])):
                continue
            if kind == "old" and path.is_dir() and not path.is_symlink() and not final.exists():
                try:
                    path.rename(final)
                except OSError:
                    continue  # left as it is rather than lost
                log(f"put back {display_path(final)}: a run was killed while it replaced it")
                continue
            removed.append(path)
    removed += [p for p in extra if p not in removed]
    folders = files = 0
    for path in removed:
        with contextlib.suppress(OSError):
            size += _size(path)
        if path.is_dir() and not path.is_symlink():
            folders += 1
            shutil.rmtree(path, ignore_errors=True)
        else:
            files += 1
            with contextlib.suppress(OSError):
                path.unlink()
    if removed:
        what = " and ".join(([f"{folders} temporary folder(s)"] if folders else [])
                            + ([f"{files} temporary file(s)"] if files else []))
        where = ", ".join(sorted({display_path(p.parent) for p in removed}))
        names = ", ".join(p.name for p in removed[:4]) + (", ..." if len(removed) > 4 else "")
        log(f"removed {what} left in {where} by interrupted runs ({_human(size)}: {names})")
    return removed


@contextlib.contextmanager
def output_lock(out: Path, what: str = "data run", log=print, leftovers=None):
    """Hold `.NAME.lock` beside the output folder for the run: one run of the stage per output at a time.

    Holding it, the run removes the leftovers that killed runs of the stage left beside the output
    (`remove_leftovers` with owned=True: only that kind, only this output's; `leftovers`, a function of
    `out`, adds the stage's own kinds) and yields their number. A second run stops with a UserError
    naming the holder's pid. The lock file goes when the run ends; parent folders made for it go too
    when the run fails.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, no clean-up of other runs' folders
        yield 0
        return
    out = Path(out)
    created = make_parents(out)
    path = out.parent / f".{out.name}.lock"
    fd = None
    done = False
    try:
        while fd is None:
            candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(candidate, 32).decode(errors="replace").strip()
                os.close(candidate)
                raise UserError(display_path(out), f"another {what}" + (f" (pid {holder})" if holder else "")
                                + " is writing this folder: wait for it to end, or stop it") from None
            try:  # a run that just ended unlinked the file we opened: lock the new one
                same = os.stat(path).st_ino == os.fstat(candidate).st_ino
            except FileNotFoundError:
                same = False
            if same:
                fd = candidate
            else:
                os.close(candidate)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        removed = remove_leftovers(out, log=log, owned=True, extra=leftovers(out) if leftovers else [])
        yield len(removed)
        done = True
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
        if not done:
            for folder in created:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def atomic_output_dir(final: Path, log=print):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    On any error the temporary folder is removed and `final` is left as it was, so an
    interrupted or failed stage never leaves a half-written output that looks complete. Parent
    folders this call had to create are removed again on failure. What runs killed before they
    could clean up left beside `final` is removed first (`remove_leftovers`, printed with `log`).
    """
    final = Path(final)
    created = make_parents(final)
    remove_leftovers(final, log=log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner_tag()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{owner_tag()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file beside `path` and rename it onto it: an interrupted write never leaves half a
    file under the name (a killed one leaves `.NAME.tmp-PID@HOST-XXXX`, which `remove_leftovers` knows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{owner_tag()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
