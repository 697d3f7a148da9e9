"""Cost: S3 requests per one-text job, and per minute of an idle worker.

Requests are counted with botocore's `provide-client-params.s3.<Operation>` event on the
worker's and the client's own boto3 clients, which also carries the key or prefix. The
event fires once per API call, before botocore's retries, so a retried call counts once;
against the local moto server no call is retried.
"""

import re
import threading
import time
from collections import Counter

from bench.harness import distinct_texts, job_spec, load_average, warm_pipeline

WAIT_POLL_SECONDS = 1.0  # Client.wait's default
JOB_ID_PATTERN = re.compile(r"job-\d{8}-\d{6}-[0-9a-f]{6}")


class RequestCounter:
    """Counts one boto3 client's S3 calls by operation name, and by operation and key."""

    def __init__(self, boto_client):
        self.counts: Counter = Counter()
        self.by_key: Counter = Counter()
        self._lock = threading.Lock()
        boto_client.meta.events.register("provide-client-params.s3", self._count)

    def _count(self, event_name: str, params: dict, **kwargs) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        key = JOB_ID_PATTERN.sub("<id>", params.get("Key") or params.get("Prefix") or "")
        with self._lock:
            self.counts[operation] += 1
            self.by_key[(operation, key)] += 1

    def take(self) -> Counter:
        """Return the counts by operation since the last call and start again from zero."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def take_by_key(self) -> Counter:
        with self._lock:
            counts, self.by_key = self.by_key, Counter()
        return counts


def s3_cost(jobs: int, idle_seconds: float, max_new_tokens: int) -> dict:
    """Count requests of `jobs` one-text jobs one by one, then of an idle worker loop."""
    from handlers.worker import LoopSettings

    with warm_pipeline(max_new_tokens) as pipeline:
        worker_counter = RequestCounter(pipeline.worker.store.client)
        client_counter = RequestCounter(pipeline.client.store.client)
        per_job = [_count_one_job(pipeline, worker_counter, client_counter, text, max_new_tokens) for text in distinct_texts(jobs)]

        settings = LoopSettings()
        worker_counter.take()
        idle = _count_idle(pipeline.worker, settings, idle_seconds, worker_counter)

    return {"jobs": per_job, "idle": idle, "poll_seconds": settings.poll_seconds, "load": load_average()}


def _count_one_job(pipeline, worker_counter: RequestCounter, client_counter: RequestCounter, text: str, max_new_tokens: int) -> dict:
    """Submit one job, run the worker pass in a thread while the client waits, and count both."""
    for counter in (worker_counter, client_counter):
        counter.take()
        counter.take_by_key()

    job_id = pipeline.client.submit(job_spec([text], max_new_tokens))
    submit = client_counter.take()

    worker_pass = threading.Thread(target=pipeline.worker.poll_once)
    worker_pass.start()
    pipeline.client.wait(job_id, poll_seconds=WAIT_POLL_SECONDS)
    worker_pass.join()
    return {"worker": worker_counter.take(), "worker_by_key": worker_counter.take_by_key(), "submit": submit, "wait": client_counter.take()}


def _count_idle(worker, settings, idle_seconds: float, counter: RequestCounter) -> dict:
    """Run the polling loop of `tokviz worker` on an empty bucket and count its requests."""
    from handlers.worker import WorkerLoop

    loop = WorkerLoop(worker, settings)
    passes = _count_passes(worker)
    thread = threading.Thread(target=loop.run)
    started = time.perf_counter()
    thread.start()
    time.sleep(idle_seconds)
    loop.stop_event.set()
    thread.join()
    elapsed = time.perf_counter() - started
    del worker.poll_once  # removes the counting wrapper, so the class's method applies again

    counts = counter.take()
    per_pass = sum(counts.values()) / passes[0]
    return {"seconds": elapsed, "passes": passes[0], "counts": counts, "per_pass": per_pass, "per_minute": per_pass * 60 / settings.poll_seconds}


def _count_passes(worker) -> list[int]:
    """Wrap the worker's `poll_once` on this instance so each pass is counted."""
    passes = [0]
    original = worker.poll_once

    def counted(*args, **kwargs):
        passes[0] += 1
        return original(*args, **kwargs)

    worker.poll_once = counted
    return passes


def describe(result: dict) -> list[str]:
    jobs = result["jobs"]
    worker_total = _mean_counts([job["worker"] for job in jobs])
    submit_total = _mean_counts([job["submit"] for job in jobs])
    wait_total = _mean_counts([job["wait"] for job in jobs])
    idle = result["idle"]
    lines = [
        f"S3 requests per one-text job, mean of {len(jobs)} jobs (load {result['load']}):",
        f"  worker: {_format(worker_total)}",
        f"  client submit: {_format(submit_total)}",
        f"  client wait (polls every {WAIT_POLL_SECONDS:g} s): {_format(wait_total)}",
        f"  idle worker loop, poll interval {result['poll_seconds']:g} s: {sum(idle['counts'].values())} requests in {idle['passes']} passes "
        f"over {idle['seconds']:.0f} s ({_format(idle['counts'])}), {idle['per_pass']:g} per pass, {idle['per_minute']:.1f} per minute",
        "  worker requests of the first job by key (<id> is the job id):",
    ]
    for (operation, key), count in sorted(jobs[0]["worker_by_key"].items(), key=lambda item: (item[0][1], item[0][0])):
        lines.append(f"    {count} x {operation} {key}")
    return lines


def _mean_counts(samples: list[Counter]) -> dict[str, float]:
    total: Counter = Counter()
    for sample in samples:
        total.update(sample)
    return {operation: count / len(samples) for operation, count in sorted(total.items())}


def _format(counts: dict) -> str:
    parts = ", ".join(f"{operation} {count:g}" for operation, count in sorted(counts.items()))
    return f"{sum(counts.values()):g} in all ({parts})"
