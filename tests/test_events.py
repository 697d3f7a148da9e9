"""Tests for handlers.events: Lambda events in the shapes AWS documents, and moto's S3 → SQS path."""

import copy
import json
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from handlers.events import (
    SOURCE_EVENTBRIDGE,
    SOURCE_S3,
    SOURCE_SQS,
    EventError,
    InboxObject,
    inbox_objects,
    is_inbox_key,
    sqs_batch_response,
    sqs_message_objects,
    sqs_record_objects,
)
from pipeline.errors import TokvizError

EVENTS_DIR = Path(__file__).parent / "events"


def load_event(name: str) -> dict:
    """Load a fixture event from tests/events."""
    return json.loads((EVENTS_DIR / name).read_text(encoding="utf-8"))


def wrap_sqs_messages(messages: list[dict]) -> dict:
    """Build the Lambda SQS event that delivers the messages that ReceiveMessage returned."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": message["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:tokviz-inbox",
                "awsRegion": "us-east-1",
            }
            for message in messages
        ]
    }


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("inbox/job.json", "", True),
        ("inbox/my job é.json", "", True),
        ("team-a/inbox/x.json", "team-a/", True),
        ("team-a/inbox/x.json", "team-a", True),
        ("team-a/inbox/x.json", "/team-a/", True),
        ("inbox/x.json", "team-a/", False),
        ("team-a/inbox/x.json", "", False),
        ("inbox/sub/x.json", "", False),
        ("inbox/.json", "", False),
        ("inbox/x.txt", "", False),
        ("inbox/x.json.tmp", "", False),
        ("inbox/", "", False),
        ("results/x/summary.json", "", False),
        ("jobs/x/status.json", "", False),
        ("tables/attributions/job_id=x/part-0.parquet", "", False),
        ("archive/inbox/x.json", "", False),
    ],
)
def test_is_inbox_key_cases(key, prefix, expected):
    assert is_inbox_key(key, prefix) is expected


def test_s3_put_decodes_key():
    objects = inbox_objects(load_event("s3_put_encoded_key.json"))

    assert objects == [
        InboxObject(
            bucket="tokviz-jobs",
            key="inbox/résumé run +1 ✓.json",
            etag='"0f343b0931126a20f133d67c2b018a3b"',
            size=412,
            source=SOURCE_S3,
            message_id=None,
        )
    ]


def test_s3_put_results_key_ignored():
    assert inbox_objects(load_event("s3_put_results_key.json")) == []


def test_sqs_test_event_ignored():
    event = load_event("sqs_s3_test_event.json")

    assert inbox_objects(event) == []
    assert sqs_message_objects(event) == {"2e1424d4-f796-459a-8184-9c92662be6da": []}


def test_sqs_batch_two_records():
    event = load_event("sqs_batch_two_records.json")

    objects = inbox_objects(event, prefix="team-a/")

    assert [item.key for item in objects] == ["team-a/inbox/sweep-01.json", "team-a/inbox/sweep 02.json"]
    assert [item.message_id for item in objects] == [
        "059f36b4-87a3-44ab-83d2-661975830a7d",
        "4b2f9c1e-0d7a-4e55-9b1c-8f0e6a3d2c11",
    ]
    assert {item.source for item in objects} == {SOURCE_SQS}
    assert [item.size for item in objects] == [388, 391]


def test_sqs_batch_wrong_prefix_empty():
    event = load_event("sqs_batch_two_records.json")

    assert inbox_objects(event) == []
    assert inbox_objects(event, prefix="team-b") == []


def test_sqs_message_objects_groups_by_id():
    event = load_event("sqs_batch_two_records.json")

    grouped = sqs_message_objects(event, prefix="team-a")

    assert list(grouped) == ["059f36b4-87a3-44ab-83d2-661975830a7d", "4b2f9c1e-0d7a-4e55-9b1c-8f0e6a3d2c11"]
    assert [item.key for item in grouped["059f36b4-87a3-44ab-83d2-661975830a7d"]] == ["team-a/inbox/sweep-01.json"]
    assert [item.key for item in grouped["4b2f9c1e-0d7a-4e55-9b1c-8f0e6a3d2c11"]] == ["team-a/inbox/sweep 02.json"]


def test_sqs_record_objects_single_record():
    record = load_event("sqs_batch_two_records.json")["Records"][1]

    objects = sqs_record_objects(record, prefix="team-a/", index=1)

    assert len(objects) == 1
    assert objects[0].message_id == "4b2f9c1e-0d7a-4e55-9b1c-8f0e6a3d2c11"
    assert objects[0].etag == '"591785b794601e212b260e25925636fd"'


def test_eventbridge_key_not_decoded():
    objects = inbox_objects(load_event("eventbridge_object_created.json"))

    assert objects == [
        InboxObject(
            bucket="tokviz-jobs",
            key="inbox/night run+1.json",
            etag='"7815696ecbf1c96e6894b779456d330e"',
            size=405,
            source=SOURCE_EVENTBRIDGE,
            message_id=None,
        )
    ]


def test_eventbridge_other_detail_type_ignored():
    event = load_event("eventbridge_object_created.json")
    event["detail-type"] = "Object Deleted"

    assert inbox_objects(event) == []


def test_sqs_wrapping_eventbridge():
    objects = inbox_objects(load_event("sqs_eventbridge_body.json"))

    assert len(objects) == 1
    assert objects[0].key == "inbox/night run+1.json"
    assert objects[0].source == SOURCE_SQS
    assert objects[0].message_id == "c7d8e9f0-1a2b-4c3d-8e4f-5a6b7c8d9e0f"


def test_s3_object_removed_ignored():
    event = load_event("s3_put_encoded_key.json")
    event["Records"][0]["eventName"] = "ObjectRemoved:Delete"

    assert inbox_objects(event) == []


def test_duplicate_deliveries_collapse():
    event = load_event("s3_put_encoded_key.json")
    event["Records"].append(copy.deepcopy(event["Records"][0]))

    assert len(inbox_objects(event)) == 1


def test_duplicate_by_sequencer_without_etag():
    event = load_event("s3_put_encoded_key.json")
    del event["Records"][0]["s3"]["object"]["eTag"]
    event["Records"].append(copy.deepcopy(event["Records"][0]))

    objects = inbox_objects(event)

    assert len(objects) == 1
    assert objects[0].etag is None


def test_new_version_same_key_kept():
    event = load_event("s3_put_encoded_key.json")
    second = copy.deepcopy(event["Records"][0])
    second["s3"]["object"]["eTag"] = "ffffffffffffffffffffffffffffffff"
    second["s3"]["object"]["sequencer"] = "0067D3F5AD8E2A9C00"
    event["Records"].append(second)

    objects = inbox_objects(event)

    assert [item.etag for item in objects] == [
        '"0f343b0931126a20f133d67c2b018a3b"',
        '"ffffffffffffffffffffffffffffffff"',
    ]


def test_duplicate_across_sqs_messages():
    event = load_event("sqs_batch_two_records.json")
    repeat = copy.deepcopy(event["Records"][0])
    repeat["messageId"] = "repeat-of-first"
    event["Records"].append(repeat)

    grouped = sqs_message_objects(event, prefix="team-a/")

    assert len(inbox_objects(event, prefix="team-a/")) == 2
    assert grouped["repeat-of-first"] == []
    assert len(grouped["059f36b4-87a3-44ab-83d2-661975830a7d"]) == 1


def test_quoted_etag_kept_once():
    event = load_event("s3_put_encoded_key.json")
    event["Records"][0]["s3"]["object"]["eTag"] = '"0f343b0931126a20f133d67c2b018a3b"'

    assert inbox_objects(event)[0].etag == '"0f343b0931126a20f133d67c2b018a3b"'


def test_event_error_is_tokviz_error():
    assert issubclass(EventError, TokvizError)


def malformed_s3_missing_key():
    event = load_event("s3_put_encoded_key.json")
    del event["Records"][0]["s3"]["object"]["key"]
    return event


def malformed_s3_size_string():
    event = load_event("s3_put_encoded_key.json")
    event["Records"][0]["s3"]["object"]["size"] = "412"
    return event


def malformed_sqs_body_not_json():
    event = load_event("sqs_s3_test_event.json")
    event["Records"][0]["body"] = "{not json"
    return event


def malformed_sqs_body_unknown():
    event = load_event("sqs_s3_test_event.json")
    event["Records"][0]["body"] = json.dumps({"hello": "world"})
    return event


def malformed_sqs_missing_message_id():
    event = load_event("sqs_s3_test_event.json")
    del event["Records"][0]["messageId"]
    return event


def malformed_eventbridge_missing_bucket():
    event = load_event("eventbridge_object_created.json")
    del event["detail"]["bucket"]
    return event


def malformed_eventbridge_other_source():
    event = load_event("eventbridge_object_created.json")
    event["source"] = "aws.ec2"
    return event


def malformed_unknown_record_source():
    event = load_event("s3_put_encoded_key.json")
    event["Records"][0]["eventSource"] = "aws:sns"
    return event


@pytest.mark.parametrize(
    ("build_event", "expected_text"),
    [
        (lambda: [], "event must be a JSON object, got array"),
        (lambda: {}, "unrecognized Lambda event"),
        (lambda: {"Records": "x"}, "event.Records must be a list, got string"),
        (malformed_s3_missing_key, "missing field Records[0].s3.object.key"),
        (malformed_s3_size_string, "Records[0].s3.object.size must be a non-negative integer"),
        (malformed_sqs_body_not_json, "Records[0].body is not JSON"),
        (malformed_sqs_body_unknown, "unrecognized SQS message 2e1424d4-f796-459a-8184-9c92662be6da"),
        (malformed_sqs_missing_message_id, "missing field Records[0].messageId"),
        (malformed_eventbridge_missing_bucket, "event.detail.bucket must be a JSON object, got null"),
        (malformed_eventbridge_other_source, "event.source is 'aws.ec2', expected 'aws.s3'"),
        (malformed_unknown_record_source, "Records[0].eventSource is 'aws:sns'"),
    ],
)
def test_malformed_event_raises(build_event, expected_text):
    with pytest.raises(EventError) as raised:
        inbox_objects(build_event())

    message = str(raised.value)
    assert expected_text in message
    assert "\n" not in message


def test_sqs_message_objects_rejects_s3_event():
    with pytest.raises(EventError, match="expected 'aws:sqs'"):
        sqs_message_objects(load_event("s3_put_encoded_key.json"))


def test_sqs_record_objects_rejects_s3_record():
    record = load_event("s3_put_encoded_key.json")["Records"][0]

    with pytest.raises(EventError, match=r"Records\[3\]\.eventSource"):
        sqs_record_objects(record, index=3)


def test_sqs_batch_response_shape():
    response = sqs_batch_response(["id-1", "id-2", "id-1"])

    assert response == {"batchItemFailures": [{"itemIdentifier": "id-1"}, {"itemIdentifier": "id-2"}]}


def test_sqs_batch_response_empty():
    assert sqs_batch_response([]) == {"batchItemFailures": []}


@pytest.mark.parametrize("bad_id", ["", None, 7])
def test_sqs_batch_response_rejects_bad_id(bad_id):
    with pytest.raises(EventError, match="invalid SQS messageId"):
        sqs_batch_response(["id-1", bad_id])


@pytest.fixture
def aws_credentials(monkeypatch):
    """Point boto3 at fake credentials so that no real account can be reached."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def receive_all_messages(sqs, queue_url: str) -> list[dict]:
    """Drain the queue, because one ReceiveMessage call returns at most 10 messages."""
    messages = []
    while True:
        batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)


def test_moto_s3_to_sqs_notifications(aws_credentials):
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        s3.create_bucket(Bucket="tokviz-jobs")
        queue_url = sqs.create_queue(QueueName="tokviz-inbox")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

        s3.put_bucket_notification_configuration(
            Bucket="tokviz-jobs",
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "Id": "tokviz-inbox",
                        "QueueArn": queue_arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {
                                "FilterRules": [
                                    {"Name": "prefix", "Value": "inbox/"},
                                    {"Name": "suffix", "Value": ".json"},
                                ]
                            }
                        },
                    }
                ]
            },
        )

        dropped = ["inbox/first.json", "inbox/second run é+1.json"]
        for key in dropped:
            s3.put_object(Bucket="tokviz-jobs", Key=key, Body=b'{"model": "smollm2"}')

        # The notification filter drops the first three keys. The fourth passes the
        # filter but sits in a folder below inbox/, so only is_inbox_key rejects it.
        for key in ["inbox/notes.txt", "results/x/summary.json", "jobs/x/status.json", "inbox/sub/nested.json"]:
            s3.put_object(Bucket="tokviz-jobs", Key=key, Body=b"{}")

        messages = receive_all_messages(sqs, queue_url)
        head_etags = [s3.head_object(Bucket="tokviz-jobs", Key=key)["ETag"] for key in dropped]

    bodies = [json.loads(message["Body"]) for message in messages]
    assert any(body.get("Event") == "s3:TestEvent" for body in bodies)
    assert len(messages) == 4

    event = wrap_sqs_messages(messages)
    objects = inbox_objects(event)

    assert [item.key for item in objects] == dropped
    assert {item.bucket for item in objects} == {"tokviz-jobs"}
    assert {item.source for item in objects} == {SOURCE_SQS}
    assert all(item.message_id for item in objects)
    assert all(item.size == len(b'{"model": "smollm2"}') for item in objects)
    assert [item.etag for item in objects] == head_etags

    grouped = sqs_message_objects(event)
    assert sorted(len(items) for items in grouped.values()) == [0, 0, 1, 1]
