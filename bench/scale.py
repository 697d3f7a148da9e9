"""Scale: one job of many short inputs against one of fewer, each in a fresh worker process.

Each job runs in its own `bench.scale_worker` process, which reports its peak resident
set size with and without the model load, so neither run's memory includes the other's. While the worker runs, this
process polls the bucket and records when each chunk marker
(`jobs/<id>/chunks/NNNNN.done.json`) and `summary.json` first appear, which shows
whether chunks reach the bucket as they finish or only at the end.

The smaller job takes every n-th text of the larger one, so both have the same mix of
text lengths.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import BUCKET, distinct_texts, job_spec, load_average

POLL_SECONDS = 0.5
REPO_ROOT = Path(__file__).resolve().parents[1]


def scale(sizes: list[int], max_new_tokens: int, chunk_size: int) -> dict:
    """Run one job per size, smallest first, and return timings, peak memory and chunk arrival times."""
    from pipeline.client import Client
    from pipeline.local_s3 import LOCAL_CREDENTIALS, LocalS3

    os.environ.update(LOCAL_CREDENTIALS)
    all_texts = distinct_texts(max(sizes))
    runs = []
    with LocalS3() as server:
        server.create_bucket(BUCKET)
        client = Client(BUCKET, endpoint_url=server.endpoint_url)
        for size in sorted(sizes):
            texts = all_texts[:: len(all_texts) // size][:size]
            spec = job_spec(texts, max_new_tokens, chunk_size=chunk_size)
            runs.append(_run_job(client, server.endpoint_url, spec, size))
    return {"max_new_tokens": max_new_tokens, "chunk_size": chunk_size, "runs": runs}


def _run_job(client, endpoint_url: str, spec: dict, size: int) -> dict:
    job_id = client.submit(spec)
    load_before = load_average()

    with tempfile.TemporaryFile(mode="w+") as errors:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.scale_worker", endpoint_url, client.bucket, job_id],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=REPO_ROOT,
        )
        arrivals, committed_s = _watch_chunks(client, job_id, process, started)
        output = process.stdout.read()
        process.wait()
        wall_s = time.perf_counter() - started
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"scale worker for {size} inputs exited {process.returncode}:\n{errors.read()[-3000:]}")

    reported = json.loads(output.strip().splitlines()[-1])
    if reported["state"] != "succeeded":
        raise RuntimeError(f"scale job {job_id} with {size} inputs ended {reported['state']}")
    timings = client.summary(job_id)["timings"]
    work_s = timings["run_seconds"] - timings["model_load_seconds"]
    return {
        "inputs": size,
        "wall_s": wall_s,
        "work_s": work_s,
        "per_input_s": work_s / size,
        "attribution_per_input_s": timings["attribution_seconds"] / size,
        "peak_rss_mib": reported["peak_rss_kib"] / 1024,
        "job_peak_rss_mib": reported["job_peak_rss_kib"] / 1024 if reported["job_peak_rss_kib"] is not None else None,
        "end_rss_mib": reported["end_rss_kib"] / 1024,
        "chunks": len(arrivals),
        "first_chunk_s": min(arrivals.values()) if arrivals else None,
        "chunks_before_commit": sum(1 for seconds in arrivals.values() if committed_s is None or seconds < committed_s),
        "committed_s": committed_s,
        "load": f"{load_before} -> {load_average()}",
    }


def _watch_chunks(client, job_id: str, process, started: float) -> tuple[dict[str, float], float | None]:
    """Poll the bucket until the worker exits, and return when each marker and the summary appeared."""
    chunks_prefix = client.layout.chunks_prefix(job_id)
    summary_key = client.layout.summary_key(job_id)
    arrivals: dict[str, float] = {}
    committed_s = None

    while True:
        running = process.poll() is None
        now = time.perf_counter() - started
        for info in client.store.list(chunks_prefix):
            if info.key.endswith(".done.json") and info.key not in arrivals:
                arrivals[info.key] = now
        if committed_s is None and client.store.exists(summary_key):
            committed_s = now
        if not running:
            return arrivals, committed_s
        time.sleep(POLL_SECONDS)


def describe(result: dict) -> list[str]:
    lines = [f"scale, one job per size in a fresh worker process (max_new_tokens {result['max_new_tokens']}, chunk_size {result['chunk_size']}):"]
    for run in result["runs"]:
        lines.append(
            f"  {run['inputs']} inputs (load {run['load']}): {run['per_input_s']:.3f} s per input after the model load "
            f"(attribution alone {run['attribution_per_input_s']:.3f} s), peak RSS {run['peak_rss_mib']:.0f} MiB "
            f"(after the model load {_mib(run['job_peak_rss_mib'])}, at the end {run['end_rss_mib']:.0f} MiB), "
            f"first of {run['chunks']} chunk markers at {run['first_chunk_s']:.1f} s, summary at {run['committed_s']:.1f} s, "
            f"{run['chunks_before_commit']} markers seen before the summary"
        )

    if len(result["runs"]) >= 2:
        small, large = result["runs"][0], result["runs"][-1]
        time_ratio = large["per_input_s"] / small["per_input_s"]
        memory_ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
        lines.append(f"  per-input time, {large['inputs']} / {small['inputs']} inputs: {time_ratio:.2f} (near 1 means linear)")
        lines.append(f"  peak RSS, {large['inputs']} / {small['inputs']} inputs: {memory_ratio:.2f} (target <= 1.20)")
        if large["job_peak_rss_mib"] is not None and small["job_peak_rss_mib"] is not None:
            lines.append(f"  peak RSS after the model load, {large['inputs']} / {small['inputs']} inputs: {large['job_peak_rss_mib'] / small['job_peak_rss_mib']:.2f}")
    return lines


def _mib(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.0f} MiB"
