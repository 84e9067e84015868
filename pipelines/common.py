"""What every stage shares: user errors, dataset and workspace paths, atomic output folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = REPO_ROOT / "datasets"


def workspace_dir() -> Path:
    """Where generated files go; `PIPELINES_WORKSPACE` moves it (tests use a temporary one)."""
    return Path(os.environ.get("PIPELINES_WORKSPACE", REPO_ROOT / "workspace"))


def env_number(name: str, default: float) -> float:
    """A limit or setting from the environment, read at each call; the default when unset or not a number."""
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


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
        candidates.insert(0, DATASETS_DIR / name_or_path)
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


@contextlib.contextmanager
def atomic_output_dir(final: Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    On any error the temporary folder is removed and `final` is left as it was, so an
    interrupted or failed stage never leaves a half-written output that looks complete. Parent
    folders this call had to create are removed again on failure.
    """
    final = Path(final)
    created = make_parents(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
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
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file beside `path` and rename it onto it: an interrupted write never leaves half a
    file under the name (nor a stray temporary one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def ordered_parallel_map(fn, items, workers: int, window_per_worker: int = 4):
    """Yield fn(item) for each item, in order, computed by `workers` spawned processes.

    At most `workers * window_per_worker` items are in flight, so memory stays flat however many
    items there are. Workers are spawned (not forked): they start clean, without the parent's
    TensorFlow threads. With one worker everything runs in this process.
    """
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    iterator = iter(items)
    pending = collections.deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for item in iterator:
            pending.append(executor.submit(fn, item))
            if len(pending) >= workers * window_per_worker:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:
                pending.append(executor.submit(fn, item))
                break
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def duration(seconds: float) -> str:
    """1m05s, 2h03m00s: for progress lines and ETAs."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
