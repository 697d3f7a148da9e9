"""Leases, attempts, cancel and retry, the clock rule and the worker's safety rules.

These run one writer at a time on the moto server; the races between worker
processes run on SeaweedFS in test_concurrency.py.
"""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from cli.main import main
from pipeline.errors import JobStateError, LeaseLostError
from pipeline.lifecycle import StatusSnapshot

# Last-Modified and Date have one-second resolution, so a 1 s lease is expired for
# certain once a little over two seconds have passed.
SHORT_LEASE = 1
EXPIRY_WAIT = 2.3


def spec(model_dir, **fields) -> dict:
    return {"model": str(model_dir), "method": "saliency", "input_texts": ["The capital of France is"], "generation_args": {"max_new_tokens": 2}, **fields}


def accepted(client, worker, job_spec, job_id):
    """Submit a job and let the worker accept it without running it."""
    client.submit(job_spec, job_id=job_id)
    for info in worker.intake.pending():
        worker.intake.accept(info)
    assert client.status(job_id)["state"] == "queued"
    return job_id


def test_expired_lease_taken_over(client, make_worker, causal_model_dir, store, layout):
    first, second = make_worker(lease_seconds=SHORT_LEASE), make_worker()
    job_id = accepted(client, first, spec(causal_model_dir), "takeover")
    stale = first.claim(job_id)
    time.sleep(EXPIRY_WAIT)

    fresh = second.claim(job_id)
    assert fresh is not None, "an expired lease must let another worker claim the next attempt"
    assert fresh.attempt == 2, "an expired lease must let another worker claim the next attempt"

    outcome = first.run_claimed(stale)
    assert outcome.state is None, f"the worker that lost its lease reported {outcome.state!r}"
    assert not store.exists(layout.summary_key(job_id)), "a worker without its lease committed results"
    with pytest.raises(LeaseLostError):
        stale.check()

    assert second.run_claimed(fresh).state == "succeeded"
    record = client.status(job_id)
    assert record["attempt"] == 2, record
    assert record["worker_id"] == second.config.worker_id, record
    assert [error["attempt"] for error in record["errors"]] == [1], record["errors"]
    assert first.config.worker_id in record["errors"][0]["message"], record["errors"][0]["message"]


def test_attempts_exhausted_job_fails(client, make_worker, causal_model_dir):
    worker = make_worker(lease_seconds=SHORT_LEASE)
    job_id = accepted(client, worker, spec(causal_model_dir, max_attempts=2), "gives-up")

    for expected_attempt in (1, 2):
        lease = make_worker(lease_seconds=SHORT_LEASE).claim(job_id)
        assert lease is not None
        assert lease.attempt == expected_attempt
        time.sleep(EXPIRY_WAIT)  # the worker "dies": its lease runs out unrenewed
    assert worker.claim(job_id) is None, "a job out of attempts must not be claimed again"

    record = client.status(job_id)
    assert record["state"] == "failed", record
    assert "gave up after 2 attempts" in record["message"], record
    assert [error["attempt"] for error in record["errors"]] == [1, 2], record["errors"]
    assert all("lease expired" in error["message"] for error in record["errors"]), record["errors"]


def test_cancel_stops_running_job(client, make_worker, causal_model_dir):
    texts = [f"The capital of country {number} is" for number in range(40)]
    worker = make_worker(lease_seconds=SHORT_LEASE)
    job_id = accepted(client, worker, spec(causal_model_dir, input_texts=texts, chunk_size=1), "cancel-me")
    lease = worker.claim(job_id)

    client.cancel(job_id)
    outcome = worker.run_claimed(lease)

    record = client.status(job_id)
    assert outcome.state == "cancelled", record
    assert record["state"] == "cancelled", record
    assert record["progress"]["chunks_done"] < len(texts), "the job ran to its end despite the cancel request"


def test_cancel_ends_queued_job(client, make_worker, causal_model_dir):
    job_id = accepted(client, make_worker(), spec(causal_model_dir), "cancel-queued")

    assert client.cancel(job_id)["state"] == "cancelled"
    assert make_worker().poll_once() == [], "a cancelled job must not run"


def test_retry_requeues_failed_job(client, make_worker, causal_model_dir):
    worker = make_worker(lease_seconds=SHORT_LEASE)
    job_id = accepted(client, worker, spec(causal_model_dir, max_attempts=1), "retry-me")
    make_worker(lease_seconds=SHORT_LEASE).claim(job_id)
    time.sleep(EXPIRY_WAIT)
    worker.claim(job_id)
    assert client.status(job_id)["state"] == "failed"

    assert client.retry(job_id)["state"] == "queued"
    make_worker().poll_once()

    record = client.status(job_id)
    assert record["state"] == "succeeded", record
    assert record["attempt"] == 2, record
    assert len(record["errors"]) == 1, "the failed attempt's error must be kept"
    with pytest.raises(JobStateError, match="only failed or cancelled jobs can be retried"):
        client.retry(job_id)


def test_wait_shows_progress(moto_server, bucket, client, make_worker, causal_model_dir):
    job_id = client.submit(spec(causal_model_dir, input_texts=["The capital of France is", "A cat sat on"]))
    make_worker().poll_once()

    result = CliRunner().invoke(main, ["--bucket", bucket, "--endpoint-url", moto_server.endpoint_url, "wait", job_id])

    assert result.exit_code == 0, result.output
    assert "2/2" in result.output, result.output
    assert f"{job_id}: succeeded" in result.output, result.output


def snapshot(age_seconds: float, lease_seconds: int | None = 3) -> StatusSnapshot:
    written = datetime(2026, 1, 1, tzinfo=UTC)
    lease = {"seconds": lease_seconds, "owner": "w", "token": "t"} if lease_seconds else None
    return StatusSnapshot({"lease": lease}, "etag", written, written + timedelta(seconds=age_seconds))


def test_lease_expiry_uses_store_clock(monkeypatch):
    import pipeline.lifecycle

    # A worker whose own clock runs a day ahead must not see a live lease as expired.
    monkeypatch.setattr(pipeline.lifecycle, "utc_now", lambda: "2099-01-01T00:00:00.000Z")
    assert not snapshot(age_seconds=2).lease_expired(), "a lease renewed 2 s ago (store time) expired"
    assert snapshot(age_seconds=4).lease_expired(), "a lease last renewed 4 s ago by the store clock is still live"
    assert snapshot(age_seconds=0, lease_seconds=None).lease_expired(), "a record without a lease must be claimable"


def test_allowlist_rejects_other_models(client, make_worker, causal_model_dir):
    job_id = client.submit(spec(causal_model_dir))

    make_worker(model_allowlist=("smollm2-*",)).poll_once()

    record = client.status(job_id)
    assert record["state"] == "rejected", record
    assert "allowlist does not include" in record["message"], record["message"]
    assert "smollm2-*" in record["message"], record["message"]


def test_remote_code_never_runs(client, make_worker, causal_model_dir, tmp_path):
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    sentinel = tmp_path / "remote-code-ran"
    config = json.loads((causal_model_dir / "config.json").read_text())
    config.update(model_type="tokviz-untrusted", auto_map={"AutoConfig": "untrusted.UntrustedConfig", "AutoModelForCausalLM": "untrusted.UntrustedModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "untrusted.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (causal_model_dir / name).exists():
            (folder / name).write_bytes((causal_model_dir / name).read_bytes())
    job_id = client.submit(spec(folder))

    make_worker().poll_once()

    record = client.status(job_id)
    assert not sentinel.exists(), "code shipped inside a model folder was executed"
    assert record["state"] in ("failed", "rejected"), record
    assert record["message"].count("\n") == 0, record["message"]


def test_download_stays_in_target(client, make_worker, causal_model_dir, store, layout, tmp_path):
    job_id = client.submit(spec(causal_model_dir))
    make_worker().poll_once()
    store.put(f"{layout.results_prefix(job_id)}../../../escaped.txt", b"x")
    target = tmp_path / "inside" / "target"

    with pytest.raises(JobStateError, match="outside"):
        client.download(job_id, target)

    assert not list(tmp_path.rglob("escaped.txt")), "download wrote a file outside its target folder"


def test_cancel_reaches_inbox_drop(client, make_worker, causal_model_dir):
    job_id = client.submit(spec(causal_model_dir), job_id="cancel-in-inbox")

    assert client.cancel(job_id)["state"] == "submitted"
    with pytest.raises(JobStateError, match="is submitted; only failed or cancelled"):
        client.retry(job_id)
    make_worker().poll_once()

    record = client.status(job_id)
    assert record["state"] == "cancelled", f"a cancel request made before the worker accepted the drop was lost: {record}"
