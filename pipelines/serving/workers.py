"""Each worker's own temporary folder, where BentoML keeps the uploads of its requests, and the clean-up
of the folders that killed workers left."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.workspace import dead_process_dirs

WORKER_DIR_PREFIX = "pipelines-worker-"


def worker_temp_dir() -> Path:
    """This worker's own temporary folder ($TMPDIR/pipelines-worker-PID), where BentoML keeps the
    uploads of its requests; made the process's temporary folder. The folders of workers that ended
    without removing theirs (killed) are removed here, and the crash is logged."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.gettempdir())
    for pid, folder in dead_process_dirs(root, WORKER_DIR_PREFIX):
        files = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        print(f"worker {pid} ended without stopping (killed or crashed): its requests in flight were "
              f"cut off; removed its {files} temporary upload file(s)", file=sys.stderr, flush=True)
    mine = root / f"{WORKER_DIR_PREFIX}{os.getpid()}"
    mine.mkdir(exist_ok=True)
    tempfile.tempdir = str(mine)
    atexit.register(shutil.rmtree, mine, True)  # and the service's shutdown hook, which runs first
    return mine
