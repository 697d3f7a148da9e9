"""Jobs against a flaky object store.

Transient faults are retried a bounded number of times, and every job still completes.
Permanent errors fail at once, naming the bucket or key.
"""

import time

import botocore.endpoint
import pytest
from click.testing import CliRunner

from cli.main import main
from pipeline.client import Client
from pipeline.errors import AccessDeniedError, BucketNotFoundError, StoreUnavailableError
from pipeline.layout import BucketLayout
from pipeline.lifecycle import TERMINAL_STATES
from pipeline.store import DEFAULT_MAX_ATTEMPTS, ObjectStore, make_client
from pipeline.worker import Worker, WorkerConfig
from tests.faults import TRANSIENT_FAULTS, FaultInjector, ScaledBackoff

FAULT_SHARE = 0.2
# botocore's standard mode waits at most 20 s between two tries of one request.
MAX_WAIT_SECONDS = 20


@pytest.fixture
def backoff(monkeypatch) -> ScaledBackoff:
    """Record botocore's retry waits and sleep only a fiftieth of each."""
    scaled = ScaledBackoff(time)
    monkeypatch.setattr(botocore.endpoint, "time", scaled)
    return scaled


def flaky_store(moto_server, bucket: str, seed: int, **fault_settings) -> tuple[ObjectStore, FaultInjector]:
    store = ObjectStore(make_client(moto_server.endpoint_url), bucket)
    settings = {"share": FAULT_SHARE, "seed": seed, **fault_settings}
    return store, FaultInjector(store.client, **settings)


def job_spec(model_dir, number: int) -> dict:
    return {
        "model": str(model_dir),
        "method": "saliency",
        "input_texts": [f"The capital of France is {number}", f"A cat sat on mat {number}"],
        "chunk_size": 1,
        "max_attempts": 10,
        "step_scores": ["probability"],
        "generation_args": {"max_new_tokens": 3},
    }


def drain(worker: Worker, client: Client, job_ids: list[str], passes: int = 40) -> dict[str, str]:
    for _ in range(passes):
        states = {job_id: client.status(job_id)["state"] for job_id in job_ids}
        if all(state in TERMINAL_STATES for state in states.values()):
            return states
        worker.poll_once()
    return {job_id: client.status(job_id)["state"] for job_id in job_ids}


def test_jobs_complete_under_faults(moto_server, bucket, causal_model_dir, model_cache, backoff):
    worker_store, worker_faults = flaky_store(moto_server, bucket, seed=11)
    client_store, client_faults = flaky_store(moto_server, bucket, seed=12)
    client = Client(bucket, endpoint_url=moto_server.endpoint_url, s3_client=client_store.client)
    worker = Worker(worker_store, BucketLayout(), WorkerConfig(allow_local_models=True, lease_seconds=30), model_cache)

    job_ids = [client.submit(job_spec(causal_model_dir, number), job_id=f"flaky-{number}") for number in range(3)]
    states = drain(worker, client, job_ids)

    assert set(states.values()) == {"succeeded"}, f"jobs did not all succeed under injected faults: {states}"
    injected = worker_faults.injected + client_faults.injected
    assert set(injected) == set(TRANSIENT_FAULTS), f"some fault kinds never fired, so they went untested: {dict(injected)}"
    assert max(backoff.waits) <= MAX_WAIT_SECONDS, f"a retry waited {max(backoff.waits):.1f} s"

    clean = Client(bucket, prefix="clean/", endpoint_url=moto_server.endpoint_url)
    reference_ids = [clean.submit(job_spec(causal_model_dir, number), job_id=f"flaky-{number}") for number in range(3)]
    drain(Worker(clean.store, BucketLayout("clean/"), WorkerConfig(allow_local_models=True), model_cache), clean, reference_ids)
    reader = Client(bucket, endpoint_url=moto_server.endpoint_url)
    for job_id in job_ids:
        for table in ("attributions", "step_scores"):
            got, expected = reader.table(job_id, table), clean.table(job_id, table)
            assert len(got) == len(expected), f"{job_id} {table}: {len(got)} rows under faults, {len(expected)} without"
            assert got.drop(columns="job_id").equals(expected.drop(columns="job_id")), f"{job_id} {table}: rows differ from a run without faults"


@pytest.mark.parametrize("kind", ["slow-down", "internal-error", "timeout", "reset"])
def test_retries_are_bounded(moto_server, bucket, backoff, kind):
    make_client(moto_server.endpoint_url).put_object(Bucket=bucket, Key="some/key.json", Body=b"{}")
    store, faults = flaky_store(moto_server, bucket, seed=1, share=1.0, kinds=(kind,))

    with pytest.raises(StoreUnavailableError) as raised:
        store.get("some/key.json")

    # ObjectStore.get repeats a whole GET only when its body breaks off. These faults
    # fail before a body exists, so only botocore's retries of one request count.
    assert faults.sent["GetObject"] == DEFAULT_MAX_ATTEMPTS, f"{kind}: {faults.sent['GetObject']} tries, expected exactly {DEFAULT_MAX_ATTEMPTS}"
    assert len(backoff.waits) == DEFAULT_MAX_ATTEMPTS - 1, f"{kind}: {len(backoff.waits)} waits between tries"
    for number, wait in enumerate(backoff.waits):
        assert wait <= min(2**number, MAX_WAIT_SECONDS), f"{kind}: wait {number + 1} lasted {wait:.2f} s, more than its cap"
    assert f"s3://{bucket}/some/key.json" in str(raised.value), f"the error does not name the object: {raised.value}"


def test_broken_body_read_again(moto_server, bucket, backoff):
    make_client(moto_server.endpoint_url).put_object(Bucket=bucket, Key="data.json", Body=b'{"a": 1}')
    store, faults = flaky_store(moto_server, bucket, seed=3, share=1.0, kinds=("broken-body",))

    with pytest.raises(StoreUnavailableError, match="broke while reading the body 3 times"):
        store.get("data.json")

    faults.random.seed(5)
    faults.share = 0.5
    bodies = {store.get("data.json").body for _ in range(5)}
    assert bodies == {b'{"a": 1}'}, f"a re-read body came back different: {bodies}"


def test_missing_bucket_fails_fast(moto_server, backoff):
    store, faults = flaky_store(moto_server, "no-such-bucket", seed=0, share=0.0)

    started = time.monotonic()
    with pytest.raises(BucketNotFoundError, match="'no-such-bucket' does not exist"):
        store.check_bucket()

    assert faults.sent["HeadBucket"] == 1, f"a missing bucket was asked {faults.sent['HeadBucket']} times"
    assert not backoff.waits, f"a missing bucket was retried after waits of {backoff.waits}"
    assert time.monotonic() - started < 5, "a missing bucket took over 5 s to report"


def test_worker_missing_bucket_one_line(moto_server):
    result = CliRunner().invoke(main, ["--bucket", "no-such-bucket", "--endpoint-url", moto_server.endpoint_url, "worker", "--once"])

    assert result.exit_code == 7, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "'no-such-bucket' does not exist" in lines[0], result.output


def test_access_denied_fails_fast(moto_server, bucket, backoff):
    store, faults = flaky_store(moto_server, bucket, seed=0, share=1.0, kinds=("access-denied",), operations=("PutObject",))

    with pytest.raises(AccessDeniedError) as raised:
        store.put("results/job/summary.json", b"{}")

    assert faults.sent["PutObject"] == 1, f"access denied was retried {faults.sent['PutObject'] - 1} times"
    assert f"s3://{bucket}/results/job/summary.json" in str(raised.value), str(raised.value)
    assert repr(bucket) in str(raised.value), str(raised.value)


def test_denied_job_fails_first_attempt(moto_server, bucket, client, causal_model_dir, model_cache, backoff):
    store, faults = flaky_store(moto_server, bucket, seed=0, share=1.0, kinds=("access-denied",), operations=("PutObject",), url_contains="/tables/")
    worker = Worker(store, BucketLayout(), WorkerConfig(allow_local_models=True), model_cache)
    job_id = client.submit(job_spec(causal_model_dir, 0), job_id="denied")

    worker.poll_once()

    record = client.status(job_id)
    assert record["state"] == "failed", f"a permanent error should fail the job at once: {record['state']}, attempt {record['attempt']}"
    assert record["attempt"] == 1, f"a permanent error should fail the job at once: {record['state']}, attempt {record['attempt']}"
    assert "Access denied" in record["message"], record["message"]
    assert f"s3://{bucket}/tables/" in record["message"], record["message"]
    # The first chunk uploads its three table parts together; each is tried once, never retried.
    assert faults.injected["access-denied"] == 3, f"the denied writes were tried {faults.injected['access-denied']} times, expected one try per table part"
