"""A one-job worker in its own process, so the scale benchmark can read its peak memory.

Run as `python -m bench.scale_worker ENDPOINT BUCKET JOB_ID`. It loads the bundled model,
then processes the queue until the job ends. It prints one JSON line with the job's state
and resident memory in KiB: the whole process's peak (`ru_maxrss`), the peak after the
model load, and the size at the end. The second is `VmHWM` after a reset through
/proc/self/clear_refs (Linux only, else null).
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLL_SECONDS = 0.2


def main() -> None:
    from bench.harness import DEVICE, MODEL
    from pipeline.client import Client
    from pipeline.lifecycle import TERMINAL_STATES
    from pipeline.worker import Worker

    endpoint_url, bucket, job_id = sys.argv[1:4]
    client = Client(bucket, endpoint_url=endpoint_url)
    worker = Worker(client.store, client.layout)

    # Loading first keeps the model load out of the job-phase peak. The job then finds
    # the model warm in the worker's cache.
    worker.models.get(MODEL, DEVICE)
    reset = _reset_peak()

    while True:
        worker.poll_once()
        state = client.status(job_id)["state"]
        if state in TERMINAL_STATES:
            break
        time.sleep(POLL_SECONDS)

    result = {
        "state": state,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "job_peak_rss_kib": _status_kib("VmHWM") if reset else None,
        "end_rss_kib": _status_kib("VmRSS"),
    }
    print(json.dumps(result))


def _reset_peak() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is missing from /proc/self/status")


if __name__ == "__main__":
    main()
