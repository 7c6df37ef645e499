"""Worker entry points for the process-pool tests: module-level (spawn pickles them by name) and light to import."""
from __future__ import annotations

import os
import time
from pathlib import Path


def sleep_job(job: tuple[str, str]) -> None:
    """``(folder, kind)``: note this worker's pid, then hold the job for 30 s and mark it finished;
    ``kind == "fail"`` instead waits for the other job to start and raises."""
    folder, kind = Path(job[0]), job[1]
    if kind == "fail":
        deadline = time.monotonic() + 30
        while not list(folder.glob("pid-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise ValueError("this job fails")
    (folder / f"pid-{os.getpid()}").touch()
    time.sleep(30)
    (folder / f"finished-{os.getpid()}").touch()
