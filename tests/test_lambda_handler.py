"""Tests for handlers.lambda_handler against the moto server process (S3 and SQS on 127.0.0.1).

Jobs run the tiny GPT-2 from conftest with a real worker. Time is simulated where a test
needs an invocation to run out of time: the handler and the worker then read one
stepping clock, and each finished chunk moves it forward.
"""

import copy
import io
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_plus, unquote_plus

import boto3
import pyarrow.parquet as pq
import pytest

import pipeline.worker
from handlers import lambda_handler
from handlers.lambda_handler import (
    Continuation,
    LambdaApp,
    RetryableError,
    app_from_env,
    parse_continuation,
)
from pipeline.errors import ConfigError
from pipeline.layout import generated_job_id
from pipeline.lifecycle import StatusBook
from pipeline.results import ResultWriter
from pipeline.worker import WorkerConfig

EVENTS_DIR = Path(__file__).parent / "events"
QUEUE_REGION = "us-east-1"
SAFETY_MARGIN_SECONDS = 60.0
SIMULATED_CHUNK_SECONDS = 1000.0
# Small enough that one simulated chunk uses up the invocation, large enough for the
# real seconds an invocation takes to reach its first chunk.
BUDGET_SECONDS = 500.0
TEXTS = [
    "The capital of France is",
    "The capital of Italy is",
    "A cat sat on the",
    "Hello world, this is",
    "The capital of Spain is",
    "A dog looked at the",
]

_queue_numbers = itertools.count()


@dataclass
class FakeContext:
    """The part of Lambda's context object that the handler reads."""

    remaining_millis: int = 900_000
    aws_request_id: str = "test-request"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_millis


class SteppingClock:
    """A monotonic clock that tests move forward, standing in for slow chunks.

    It replaces the `time` module inside pipeline.worker only, so other libraries keep
    the real clock.
    """

    def __init__(self):
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def perf_counter(self) -> float:
        return time.perf_counter()

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass(frozen=True)
class Queue:
    """An SQS queue on the moto server."""

    url: str
    arn: str


@pytest.fixture
def sqs(moto_server):
    return boto3.client("sqs", endpoint_url=moto_server.endpoint_url, region_name=QUEUE_REGION)


@pytest.fixture
def queue(sqs) -> Queue:
    """A fresh queue for each test."""
    url = sqs.create_queue(QueueName=f"tokviz-test-{next(_queue_numbers)}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return Queue(url, arn)


@pytest.fixture
def make_app(store, layout, model_cache):
    """Build apps on the test bucket that may load the tiny local models."""

    def build(**settings) -> LambdaApp:
        config = WorkerConfig(allow_local_models=True, lease_seconds=30)
        return LambdaApp(store, layout, config, model_cache, **settings)

    return build


@pytest.fixture
def restore_logging():
    """Put back the root logger's handlers and level after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def job_spec(model_dir: Path, texts: list[str] = TEXTS, **fields) -> dict:
    spec = {
        "model": str(model_dir),
        "method": "saliency",
        "input_texts": texts,
        "chunk_size": 2,
        "generation_args": {"max_new_tokens": 2},
    }
    spec.update(fields)
    return spec


def drop_spec(store, key: str, spec: dict) -> None:
    store.put(key, json.dumps(spec).encode(), content_type="application/json")


def s3_notification(bucket: str, key: str, etag: str | None = None, size: int | None = None) -> dict:
    """Build an S3 ObjectCreated notification in the documented shape, with the key URL-encoded."""
    s3_object = {"key": quote_plus(key), "sequencer": "0067D3F5AD8E2A9B4C"}
    if etag is not None:
        s3_object["eTag"] = etag.strip('"')
    if size is not None:
        s3_object["size"] = size
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": QUEUE_REGION,
        "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": s3_object},
    }
    return {"Records": [record]}


def sqs_record(message_id: str, body: str, queue_arn: str = "arn:aws:sqs:us-east-1:123456789012:tokviz-inbox") -> dict:
    """Build one record of a Lambda SQS event."""
    return {
        "messageId": message_id,
        "receiptHandle": f"{message_id}-handle",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": QUEUE_REGION,
    }


def lambda_sqs_event(messages: list[dict], queue: Queue) -> dict:
    """Wrap messages that ReceiveMessage returned as the event Lambda's SQS poller sends."""
    records = []
    for message in messages:
        record = sqs_record(message["MessageId"], message["Body"], queue.arn)
        record["receiptHandle"] = message["ReceiptHandle"]
        record["md5OfBody"] = message["MD5OfBody"]
        record["attributes"] = {name: str(value) for name, value in message.get("Attributes", {}).items()}
        records.append(record)
    return {"Records": records}


def receive_all(sqs, queue: Queue) -> list[dict]:
    """Receive and delete every visible message, as Lambda does for a successful batch."""
    messages = []
    while True:
        response = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=0, AttributeNames=["All"])
        batch = response.get("Messages", [])
        if not batch:
            return messages
        for message in batch:
            sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=message["ReceiptHandle"])
        messages.extend(batch)


def load_event(name: str) -> dict:
    return json.loads((EVENTS_DIR / name).read_text(encoding="utf-8"))


def status_of(store, layout, job_id: str) -> dict:
    return StatusBook(store, layout).read(job_id).record


def attribution_rows(store, layout, job_id: str):
    """Read every attributions part of a job into one pandas DataFrame."""
    import pandas as pd

    parts = [pq.read_table(io.BytesIO(store.get(info.key).body)).to_pandas() for info in store.list(layout.table_partition_prefix("attributions", job_id))]
    return pd.concat(parts, ignore_index=True)


def chunk_marker_count(store, layout, job_id: str) -> int:
    return sum(1 for info in store.list(layout.chunks_prefix(job_id)) if info.key.endswith(".done.json"))


def slow_chunks(monkeypatch, clock: SteppingClock) -> None:
    """Make every finished chunk move the clock forward by SIMULATED_CHUNK_SECONDS."""
    original = ResultWriter.write_chunk

    def write_chunk(self, *args, **kwargs):
        record = original(self, *args, **kwargs)
        clock.advance(SIMULATED_CHUNK_SECONDS)
        return record

    monkeypatch.setattr(pipeline.worker, "time", clock)
    monkeypatch.setattr(ResultWriter, "write_chunk", write_chunk)


def past_clock() -> float:
    """Return a clock reading so early that every deadline built from it has passed."""
    return time.monotonic() - 100_000


def test_long_job_continues_across_invocations(monkeypatch, make_app, store, layout, bucket, sqs, queue, causal_model_dir):
    clock = SteppingClock()
    slow_chunks(monkeypatch, clock)
    app = make_app(sqs_client=sqs, continuation_queue_url=queue.url, safety_margin_seconds=SAFETY_MARGIN_SECONDS, clock=clock.monotonic)
    context = FakeContext(remaining_millis=int((SAFETY_MARGIN_SECONDS + BUDGET_SECONDS) * 1000))
    key = layout.inbox_key("long-job")
    drop_spec(store, key, job_spec(causal_model_dir))

    first = app.handle(s3_notification(bucket, key), context)
    invocations = 1
    assert first["jobs"] == [{"job_id": "long-job", "state": "queued", "chunks_computed": 1, "continued": True}]

    while messages := receive_all(sqs, queue):
        assert len(messages) == 1
        assert json.loads(messages[0]["Body"]) == {"tokviz": "continue", "job_id": "long-job", "releases_without_progress": 0}
        response = app.handle(lambda_sqs_event(messages, queue), context)
        invocations += 1
        assert response == {"batchItemFailures": []}
        assert invocations <= 10, "the job kept asking for continuations"

    record = status_of(store, layout, "long-job")
    assert invocations == 3
    assert record["state"] == "succeeded"
    assert record["attempt"] == 1
    assert app.worker.chunks_computed == 3
    assert chunk_marker_count(store, layout, "long-job") == 3

    summary = store.get_json(layout.summary_key("long-job"))[0]
    assert summary["chunks"] == 3
    assert summary["sequences"] == 6

    rows = attribution_rows(store, layout, "long-job")
    assert sorted(rows["sequence_idx"].unique()) == [0, 1, 2, 3, 4, 5]
    per_cell = rows.groupby(["sequence_idx", "target_idx", "side", "input_idx"]).size()
    assert (per_cell == 1).all(), per_cell[per_cell > 1]


def test_moto_notifications_run_job(make_app, store, layout, bucket, sqs, queue, causal_model_dir):
    store.client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue.arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "inbox/"}, {"Name": "suffix", "Value": ".json"}]}},
                }
            ]
        },
    )
    drop_spec(store, layout.inbox_key("from-moto"), job_spec(causal_model_dir, TEXTS[:2]))
    messages = receive_all(sqs, queue)
    event = lambda_sqs_event(messages, queue)
    bodies = [json.loads(message["Body"]) for message in messages]
    app = make_app()

    response = app.handle(event, FakeContext())

    assert len(messages) == 2
    assert [body.get("Event") for body in bodies].count("s3:TestEvent") == 1
    # moto URL-encodes the "/" too, which S3 leaves as is; both decode to the same key.
    assert [unquote_plus(body["Records"][0]["s3"]["object"]["key"]) for body in bodies if "Records" in body] == ["inbox/from-moto.json"]
    assert response == {"batchItemFailures": []}
    assert status_of(store, layout, "from-moto")["state"] == "succeeded"
    assert not store.exists(layout.inbox_key("from-moto"))
    summary_etag = store.head(layout.summary_key("from-moto")).etag
    chunks_before = app.worker.chunks_computed

    duplicate = app.handle(copy.deepcopy(event), FakeContext())

    record = status_of(store, layout, "from-moto")
    assert duplicate == {"batchItemFailures": []}
    assert record["state"] == "succeeded"
    assert record["attempt"] == 1
    assert store.head(layout.summary_key("from-moto")).etag == summary_etag
    assert app.worker.chunks_computed == chunks_before
    assert receive_all(sqs, queue) == []


def test_s3_fixture_event_runs_job(make_app, store, layout, bucket, causal_model_dir):
    event = load_event("s3_put_encoded_key.json")
    key = "inbox/résumé run +1 ✓.json"
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    stored = store.head(key)
    s3_object = event["Records"][0]["s3"]["object"]
    event["Records"][0]["s3"]["bucket"]["name"] = bucket
    s3_object.update(eTag=stored.etag.strip('"'), size=stored.size)
    job_id = generated_job_id(key, stored.etag)

    response = make_app().handle(event, FakeContext())

    assert response == {"objects": 1, "jobs": [{"job_id": job_id, "state": "succeeded", "chunks_computed": 1, "continued": False}]}
    assert status_of(store, layout, job_id)["source"]["original_name"] == "résumé run +1 ✓.json"
    assert store.exists(layout.summary_key(job_id))


def test_eventbridge_fixture_event_runs_job(make_app, store, layout, bucket, causal_model_dir):
    event = load_event("eventbridge_object_created.json")
    key = "inbox/night run+1.json"
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    stored = store.head(key)
    event["resources"] = [f"arn:aws:s3:::{bucket}"]
    event["detail"]["bucket"]["name"] = bucket
    event["detail"]["object"].update(etag=stored.etag.strip('"'), size=stored.size)
    job_id = generated_job_id(key, stored.etag)

    response = make_app().handle(event, FakeContext())

    assert response["objects"] == 1
    assert response["jobs"][0]["job_id"] == job_id
    assert response["jobs"][0]["state"] == "succeeded"
    assert status_of(store, layout, job_id)["state"] == "succeeded"


def test_malformed_record_fails_alone(make_app, store, layout, bucket, causal_model_dir):
    key = layout.inbox_key("good-one")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    event = {
        "Records": [
            sqs_record("not-json", "{this is not json"),
            sqs_record("good", json.dumps(s3_notification(bucket, key))),
            sqs_record("bad-continuation", json.dumps({"tokviz": "continue", "job_id": "../escape"})),
            sqs_record("unknown-body", json.dumps({"hello": "world"})),
        ]
    }

    response = make_app().handle(event, FakeContext())

    failed = [item["itemIdentifier"] for item in response["batchItemFailures"]]
    assert failed == ["not-json", "bad-continuation", "unknown-body"]
    assert status_of(store, layout, "good-one")["state"] == "succeeded"


@pytest.mark.parametrize(
    ("job_id", "bad_field", "expected_state"),
    [
        ("rejected-at-intake", "method", "rejected"),
        ("rejected-at-load", "missing_model", "rejected"),
        ("failed-at-load", "empty_model", "failed"),
    ],
)
def test_terminal_job_record_succeeds(make_app, store, layout, bucket, causal_model_dir, tmp_path, job_id, bad_field, expected_state):
    bad_fields = {
        "method": {"method": "no_such_method"},
        "missing_model": {"model": str(tmp_path / "missing")},
        # A directory without a saved model makes transformers fail to load it.
        "empty_model": {"model": str(tmp_path)},
    }[bad_field]
    key = layout.inbox_key(job_id)
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1], **bad_fields))
    event = {"Records": [sqs_record("message-1", json.dumps(s3_notification(bucket, key)))]}

    response = make_app().handle(event, FakeContext())

    assert response == {"batchItemFailures": []}
    assert status_of(store, layout, job_id)["state"] == expected_state


def test_store_error_fails_record(moto_server, layout, model_cache):
    from pipeline.store import ObjectStore, make_client

    missing = ObjectStore(make_client(moto_server.endpoint_url), "tokviz-missing-bucket")
    app = LambdaApp(missing, layout, WorkerConfig(allow_local_models=True), model_cache)
    event = {"Records": [sqs_record("message-1", json.dumps(s3_notification("tokviz-missing-bucket", "inbox/x.json", etag="abc")))]}

    response = app.handle(event, FakeContext())

    assert response == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}


def test_direct_event_store_error_raises(moto_server, layout, model_cache):
    from pipeline.store import ObjectStore, make_client

    missing = ObjectStore(make_client(moto_server.endpoint_url), "tokviz-missing-bucket")
    app = LambdaApp(missing, layout, WorkerConfig(allow_local_models=True), model_cache)

    with pytest.raises(RetryableError, match="1 of 1 inbox objects failed"):
        app.handle(s3_notification("tokviz-missing-bucket", "inbox/x.json", etag="abc"), FakeContext())


def test_other_bucket_event_ignored(make_app, store, layout, causal_model_dir):
    key = layout.inbox_key("elsewhere")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))

    response = make_app().handle(s3_notification("some-other-bucket", key), FakeContext())

    assert response == {"objects": 1, "jobs": []}
    assert store.exists(key)


def test_release_without_queue_url_warns(caplog, make_app, store, layout, bucket, causal_model_dir):
    key = layout.inbox_key("no-queue")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    app = make_app(clock=past_clock)

    with caplog.at_level(logging.WARNING, logger="handlers"):
        response = app.handle(s3_notification(bucket, key), FakeContext())

    assert response["jobs"] == [{"job_id": "no-queue", "state": "queued", "chunks_computed": 0, "continued": False}]
    assert status_of(store, layout, "no-queue")["state"] == "queued"
    assert store.exists(layout.queue_key("no-queue"))
    assert any("TOKVIZ_CONTINUATION_QUEUE_URL is not set" in record.getMessage() for record in caplog.records)


def test_stalled_job_stops_continuing(caplog, make_app, store, layout, bucket, sqs, queue, causal_model_dir):
    key = layout.inbox_key("stalled")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    app = make_app(sqs_client=sqs, continuation_queue_url=queue.url, clock=past_clock)
    app.handle(s3_notification(bucket, key), FakeContext())
    counts = []

    with caplog.at_level(logging.ERROR, logger="handlers"):
        while messages := receive_all(sqs, queue):
            counts.append(json.loads(messages[0]["Body"])["releases_without_progress"])
            assert app.handle(lambda_sqs_event(messages, queue), FakeContext()) == {"batchItemFailures": []}
            assert len(counts) <= 10, "the job kept asking for continuations"

    assert counts == [1, 2, 3]
    assert status_of(store, layout, "stalled")["state"] == "queued"
    assert status_of(store, layout, "stalled")["attempt"] == 0
    assert any("without finishing a chunk" in record.getMessage() for record in caplog.records)


def test_continuation_send_failure_fails_record(moto_server, make_app, store, layout, bucket, sqs, causal_model_dir):
    key = layout.inbox_key("unsent")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    missing_queue = f"{moto_server.endpoint_url}/123456789012/tokviz-missing-queue"
    app = make_app(sqs_client=sqs, continuation_queue_url=missing_queue, clock=past_clock)
    event = {"Records": [sqs_record("message-1", json.dumps(s3_notification(bucket, key)))]}

    response = app.handle(event, FakeContext())

    assert response == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    assert status_of(store, layout, "unsent")["state"] == "queued"


def test_redelivery_resumes_released_job(make_app, store, layout, bucket, causal_model_dir):
    key = layout.inbox_key("resumed")
    drop_spec(store, key, job_spec(causal_model_dir, TEXTS[:1]))
    event = {"Records": [sqs_record("message-1", json.dumps(s3_notification(bucket, key)))]}
    make_app(clock=past_clock).handle(event, FakeContext())
    assert status_of(store, layout, "resumed")["state"] == "queued"

    response = make_app().handle(event, FakeContext())

    assert response == {"batchItemFailures": []}
    assert status_of(store, layout, "resumed")["state"] == "succeeded"


def test_continuation_for_unknown_job(make_app):
    event = {"Records": [sqs_record("message-1", Continuation("never-created").body())]}

    assert make_app().handle(event, FakeContext()) == {"batchItemFailures": []}


def test_deadline_from_context(make_app):
    app = make_app(safety_margin_seconds=60, clock=lambda: 1000.0)

    app.start_invocation(FakeContext(remaining_millis=120_000))
    assert app.worker.config.deadline == pytest.approx(1060.0)

    app.start_invocation(FakeContext(remaining_millis=30_000))
    assert app.worker.config.deadline == pytest.approx(1015.0)

    app.start_invocation(None)
    assert app.worker.config.deadline is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"tokviz": "continue", "job_id": "job-1"}', Continuation("job-1", 0)),
        ('{"tokviz": "continue", "job_id": "job-1", "releases_without_progress": 2}', Continuation("job-1", 2)),
        ('{"Records": []}', None),
        ("not json", None),
        ("[1, 2]", None),
    ],
)
def test_parse_continuation_cases(body, expected):
    assert parse_continuation(sqs_record("message-1", body)) == expected


@pytest.mark.parametrize(
    "body",
    [
        '{"tokviz": "stop", "job_id": "job-1"}',
        '{"tokviz": "continue"}',
        '{"tokviz": "continue", "job_id": "a/b"}',
        '{"tokviz": "continue", "job_id": "job-1", "releases_without_progress": -1}',
        '{"tokviz": "continue", "job_id": "job-1", "releases_without_progress": true}',
    ],
)
def test_parse_continuation_rejects(body):
    from handlers.events import EventError

    with pytest.raises(EventError, match="invalid continuation message"):
        parse_continuation(sqs_record("message-1", body))


def test_handler_builds_app_from_env(monkeypatch, capsys, restore_logging, moto_server, store, layout, bucket, queue, tmp_path, causal_model_dir):
    monkeypatch.setattr(lambda_handler, "_app", None)
    monkeypatch.setenv("TOKVIZ_BUCKET", bucket)
    monkeypatch.setenv("TOKVIZ_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_server.endpoint_url)
    monkeypatch.setenv("TOKVIZ_CONTINUATION_QUEUE_URL", queue.url)
    monkeypatch.setenv("TOKVIZ_ALLOW_LOCAL_MODELS", "true")
    monkeypatch.setenv("TOKVIZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKVIZ_SAFETY_MARGIN_SECONDS", "30")
    secret_text = "Quartz sentinel phrase"
    key = layout.inbox_key("from-env")
    drop_spec(store, key, job_spec(causal_model_dir, [secret_text]))

    response = lambda_handler.handler(s3_notification(bucket, key), FakeContext())
    app = lambda_handler._app
    empty = lambda_handler.handler({"Records": []}, FakeContext())

    assert response["jobs"][0]["state"] == "succeeded"
    assert empty == {"objects": 0, "jobs": []}
    assert lambda_handler._app is app
    assert app.continuation_queue_url == queue.url
    assert app.safety_margin_seconds == 30.0
    assert app.worker.config.allow_local_models is True

    logged = capsys.readouterr().err
    entries = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert any(entry.get("job_id") == "from-env" for entry in entries)
    assert secret_text not in logged


@pytest.mark.parametrize(
    ("variables", "expected_text"),
    [
        ({}, "TOKVIZ_BUCKET is not set"),
        ({"TOKVIZ_BUCKET": "b", "TOKVIZ_ALLOW_LOCAL_MODELS": "maybe"}, "Invalid TOKVIZ_ALLOW_LOCAL_MODELS"),
        ({"TOKVIZ_BUCKET": "b", "TOKVIZ_SAFETY_MARGIN_SECONDS": "soon"}, "Invalid TOKVIZ_SAFETY_MARGIN_SECONDS"),
        ({"TOKVIZ_BUCKET": "b", "TOKVIZ_SAFETY_MARGIN_SECONDS": "-5"}, "use 0 or more seconds"),
    ],
)
def test_app_from_env_rejects_invalid(variables, expected_text):
    with pytest.raises(ConfigError, match=expected_text):
        app_from_env(variables)


def test_app_from_env_reads_allowlist(moto_server):
    app = app_from_env({"TOKVIZ_BUCKET": "b", "TOKVIZ_ENDPOINT_URL": moto_server.endpoint_url, "TOKVIZ_MODEL_ALLOWLIST": "org/a, org/b-*,", "TOKVIZ_PREFIX": "team-a"})

    assert app.worker.config.model_allowlist == ("org/a", "org/b-*")
    assert app.layout.prefix == "team-a/"
    assert app.continuation_queue_url is None
    assert app.safety_margin_seconds == 60.0
