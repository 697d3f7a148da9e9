"""Parse the Lambda events that announce job specs dropped into the inbox.

Three delivery paths reach the Lambda handler, and each carries the object in a
different shape:

- an S3 event notification sent straight to Lambda (`Records[].eventSource == "aws:s3"`);
- an SQS message whose body is an S3 event notification, the `s3:TestEvent` that S3
  sends when the notification is configured, or an EventBridge event that a rule
  forwarded to the queue (`Records[].eventSource == "aws:sqs"`);
- an EventBridge "Object Created" event (`source == "aws.s3"`).

Every function here is pure: it reads the event dict and calls no AWS API.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from pipeline.errors import TokvizError
from pipeline.layout import BucketLayout

SOURCE_S3 = "s3"
SOURCE_SQS = "sqs"
SOURCE_EVENTBRIDGE = "eventbridge"

SPEC_SUFFIX = ".json"


class EventError(TokvizError):
    """A Lambda event is malformed or of a kind this handler does not accept."""


@dataclass(frozen=True)
class InboxObject:
    """A job spec object that a Lambda event announced.

    `key` is the decoded object key, ready for GetObject. `etag` is in the quoted
    form that HeadObject and ListObjectsV2 return, which pipeline.store keeps too.
    `size` is in bytes. `source` is the delivery path (`SOURCE_S3`, `SOURCE_SQS` or
    `SOURCE_EVENTBRIDGE`). `message_id` is the SQS messageId of the record that
    carried the object, or None outside SQS.
    """

    bucket: str
    key: str
    etag: str | None
    size: int | None
    source: str
    message_id: str | None


@dataclass(frozen=True)
class _Candidate:
    """An announced object before the inbox filter and duplicate removal."""

    item: InboxObject
    sequencer: str | None


def is_inbox_key(key: str, prefix: str = "") -> bool:
    """Return whether `key` is a job drop: `<prefix>inbox/<name>.json` with no slash in `<name>`.

    The prefix is normalized as BucketLayout does, so "team-a", "team-a/" and
    "/team-a/" all accept "team-a/inbox/x.json". Outputs under `jobs/`, `results/`
    and `tables/` never match, so writing them cannot start another job.
    """
    inbox = BucketLayout(prefix).inbox_prefix
    if not key.startswith(inbox):
        return False

    file_name = key[len(inbox):]
    if "/" in file_name or not file_name.endswith(SPEC_SUFFIX):
        return False

    return len(file_name) > len(SPEC_SUFFIX)


def inbox_objects(event: Any, prefix: str = "") -> list[InboxObject]:
    """Extract the job drops that a Lambda event announces, in event order.

    Events of other kinds inside a supported envelope are skipped and return no
    objects: the S3 test event, ObjectRemoved and other non-create events, and
    keys that `is_inbox_key` rejects. Duplicate deliveries of one object collapse
    into the first. Raises EventError, naming the field, when the event is malformed
    or comes from an unsupported source.
    """
    candidates = _event_candidates(event)
    return _unique_inbox_items(candidates, prefix)


def sqs_record_objects(record: Any, prefix: str = "", index: int = 0) -> list[InboxObject]:
    """Extract the job drops of one SQS record, tagged with its messageId.

    A handler that reports partial batch failures can call this per record, so that
    a malformed message fails alone. `index` is the record's position in the
    batch and only appears in error messages. Raises EventError when the record is
    malformed.
    """
    path = f"Records[{index}]"
    record = _require_mapping(record, path)
    if record.get("eventSource") != "aws:sqs":
        raise EventError(
            f"invalid SQS record: {path}.eventSource is {record.get('eventSource')!r}, expected 'aws:sqs'"
        )

    candidates = _sqs_record_candidates(record, path)
    return _unique_inbox_items(candidates, prefix)


def sqs_message_objects(event: Any, prefix: str = "") -> dict[str, list[InboxObject]]:
    """Group the job drops of an SQS event by messageId, with one entry per record.

    A record that announces no job drop (a test event, a non-inbox key, or a
    duplicate of an object earlier in the batch) maps to an empty list, so it can
    be reported as processed. Raises EventError when the event is not an SQS event
    or any record is malformed.
    """
    records = _require_records(event)

    candidates = []
    for index, record in enumerate(records):
        path = f"Records[{index}]"
        record = _require_mapping(record, path)
        if record.get("eventSource") != "aws:sqs":
            raise EventError(
                f"invalid SQS event: {path}.eventSource is {record.get('eventSource')!r}, expected 'aws:sqs'"
            )
        message_id = _require_str(record, "messageId", path)
        candidates.append((message_id, _sqs_record_candidates(record, path)))

    # Remove duplicates across the whole batch, so one object starts one job even
    # when two messages announce it.
    grouped: dict[str, list[InboxObject]] = {message_id: [] for message_id, _ in candidates}
    batch_candidates = [candidate for _, record_candidates in candidates for candidate in record_candidates]
    for item in _unique_inbox_items(batch_candidates, prefix):
        grouped[item.message_id].append(item)

    return grouped


def sqs_batch_response(failed_message_ids: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """Build the partial batch response that Lambda expects with ReportBatchItemFailures.

    Lambda deletes every message of the batch that is not listed. The listed ones
    stay in the queue and become visible again when their visibility timeout ends.
    An empty list reports the whole batch as processed.
    Repeated ids are listed once. Raises EventError on an empty or non-string id,
    because Lambda treats such a response as a failure of the whole batch.
    """
    failures = []
    seen: set[str] = set()
    for message_id in failed_message_ids:
        if not isinstance(message_id, str) or not message_id:
            raise EventError(
                f"invalid SQS messageId {message_id!r} in failed_message_ids: expected a non-empty string"
            )

        if message_id not in seen:
            seen.add(message_id)
            failures.append({"itemIdentifier": message_id})

    return {"batchItemFailures": failures}


def _unique_inbox_items(candidates: Iterable[_Candidate], prefix: str) -> list[InboxObject]:
    """Keep the candidates with inbox keys, dropping repeat deliveries of one object.

    S3 delivers notifications at least once, so one PUT can arrive several times.
    Two deliveries are the same object when bucket and key match and so does the
    ETag or the sequencer. When a delivery carries neither, bucket and key decide.
    Matching ETags collapse even with different sequencers, because the same bytes
    under the same key make the same job (generated_job_id hashes key and ETag).
    """
    seen: set[tuple[str, str, str, str | None]] = set()
    unique = []
    for candidate in candidates:
        item = candidate.item
        if not is_inbox_key(item.key, prefix):
            continue

        identities = _delivery_identities(item, candidate.sequencer)
        if seen.intersection(identities):
            continue

        seen.update(identities)
        unique.append(item)

    return unique


def _delivery_identities(item: InboxObject, sequencer: str | None) -> set[tuple[str, str, str, str | None]]:
    """List the tuples under which a delivery counts as a repeat of an earlier one."""
    identities = set()
    if item.etag is not None:
        identities.add((item.bucket, item.key, "etag", item.etag))
    if sequencer is not None:
        identities.add((item.bucket, item.key, "sequencer", sequencer))
    if not identities:
        identities.add((item.bucket, item.key, "key", None))
    return identities


def _event_candidates(event: Any) -> list[_Candidate]:
    """Dispatch on the event's envelope and collect every announced object."""
    event = _require_mapping(event, "event")

    if "Records" in event:
        records = _require_records(event)
        candidates = []
        for index, record in enumerate(records):
            candidates.extend(_record_candidates(record, f"Records[{index}]"))
        return candidates

    if "detail-type" in event or "source" in event:
        return _eventbridge_candidates(event, "event", SOURCE_EVENTBRIDGE, None)

    if _is_s3_test_event(event):
        return []

    raise EventError(
        "unrecognized Lambda event: expected a Records list (S3 or SQS) or an EventBridge event with source 'aws.s3'"
    )


def _record_candidates(record: Any, path: str) -> list[_Candidate]:
    """Parse one top-level record, which S3 or SQS delivered to Lambda."""
    record = _require_mapping(record, path)
    event_source = record.get("eventSource")

    if event_source == "aws:s3":
        return _s3_record_candidates(record, path, SOURCE_S3, None)
    if event_source == "aws:sqs":
        return _sqs_record_candidates(record, path)

    raise EventError(
        f"unsupported record: {path}.eventSource is {event_source!r}, expected 'aws:s3' or 'aws:sqs'"
    )


def _sqs_record_candidates(record: Mapping[str, Any], path: str) -> list[_Candidate]:
    """Parse the body of an SQS record, which carries an S3 or EventBridge event as JSON."""
    message_id = _require_str(record, "messageId", path)
    body_text = _require_str(record, "body", path)

    try:
        body = json.loads(body_text)
    except json.JSONDecodeError as error:
        raise EventError(f"invalid SQS message {message_id}: {path}.body is not JSON ({error})") from None

    body_path = f"{path}.body"
    body = _require_mapping(body, body_path)

    # S3 queues this message once when the notification configuration is saved.
    if _is_s3_test_event(body):
        return []

    if "Records" in body:
        s3_records = _require_records(body, body_path)
        candidates = []
        for index, s3_record in enumerate(s3_records):
            s3_path = f"{body_path}.Records[{index}]"
            s3_record = _require_mapping(s3_record, s3_path)
            if s3_record.get("eventSource") != "aws:s3":
                raise EventError(
                    f"unsupported record in SQS message {message_id}: "
                    f"{s3_path}.eventSource is {s3_record.get('eventSource')!r}, expected 'aws:s3'"
                )
            candidates.extend(_s3_record_candidates(s3_record, s3_path, SOURCE_SQS, message_id))
        return candidates

    if "detail-type" in body or "source" in body:
        return _eventbridge_candidates(body, body_path, SOURCE_SQS, message_id)

    raise EventError(
        f"unrecognized SQS message {message_id}: "
        f"{body_path} is neither an S3 notification, an S3 test event nor an EventBridge event"
    )


def _s3_record_candidates(
    record: Mapping[str, Any], path: str, source: str, message_id: str | None
) -> list[_Candidate]:
    """Parse one S3 notification record, skipping events other than ObjectCreated."""
    event_name = _require_str(record, "eventName", path)
    if not event_name.startswith("ObjectCreated:"):
        return []

    s3 = _require_mapping(record.get("s3"), f"{path}.s3")
    bucket = _require_mapping(s3.get("bucket"), f"{path}.s3.bucket")
    s3_object = _require_mapping(s3.get("object"), f"{path}.s3.object")
    object_path = f"{path}.s3.object"

    # The S3 User Guide ("Event message structure") states that the key in a
    # notification is URL-encoded, with "+" for a space, so "a+b" must decode to "a b".
    key = unquote_plus(_require_str(s3_object, "key", object_path))

    item = InboxObject(
        bucket=_require_str(bucket, "name", f"{path}.s3.bucket"),
        key=key,
        etag=_optional_etag(s3_object, "eTag", object_path),
        size=_optional_size(s3_object, "size", object_path),
        source=source,
        message_id=message_id,
    )
    return [_Candidate(item, _optional_str(s3_object, "sequencer", object_path))]


def _eventbridge_candidates(
    event: Mapping[str, Any], path: str, source: str, message_id: str | None
) -> list[_Candidate]:
    """Parse an EventBridge event from S3, skipping detail types other than Object Created."""
    event_source = event.get("source")
    if event_source != "aws.s3":
        raise EventError(
            f"unsupported EventBridge event: {path}.source is {event_source!r}, expected 'aws.s3'"
        )

    detail_type = _require_str(event, "detail-type", path)
    if detail_type != "Object Created":
        return []

    detail_path = f"{path}.detail"
    detail = _require_mapping(event.get("detail"), detail_path)
    bucket = _require_mapping(detail.get("bucket"), f"{detail_path}.bucket")
    object_path = f"{detail_path}.object"
    s3_object = _require_mapping(detail.get("object"), object_path)

    # NOTE: the S3 User Guide ("EventBridge event message structure") documents no
    # encoding for detail.object.key and its examples show plain keys, unlike the
    # notification format, so the key is used as given. Decoding it would turn a
    # literal "+" into a space.
    key = _require_str(s3_object, "key", object_path)

    item = InboxObject(
        bucket=_require_str(bucket, "name", f"{detail_path}.bucket"),
        key=key,
        etag=_optional_etag(s3_object, "etag", object_path),
        size=_optional_size(s3_object, "size", object_path),
        source=source,
        message_id=message_id,
    )
    return [_Candidate(item, _optional_str(s3_object, "sequencer", object_path))]


def _is_s3_test_event(body: Mapping[str, Any]) -> bool:
    """Return whether the message is the `s3:TestEvent` that S3 sends to a new destination."""
    return body.get("Event") == "s3:TestEvent"


def _require_records(event: Any, path: str = "event") -> list[Any]:
    """Return the event's Records list, raising EventError when it is missing or not a list."""
    event = _require_mapping(event, path)
    records = event.get("Records")
    if not isinstance(records, list):
        raise EventError(f"invalid event: {path}.Records must be a list, got {_type_name(records)}")
    return records


def _require_mapping(value: Any, path: str) -> Mapping[str, Any]:
    """Return `value` when it is a JSON object, raising EventError otherwise."""
    if not isinstance(value, Mapping):
        raise EventError(f"invalid event: {path} must be a JSON object, got {_type_name(value)}")
    return value


def _require_str(mapping: Mapping[str, Any], field: str, path: str) -> str:
    """Return a required non-empty string field, raising EventError when it is missing or invalid."""
    value = mapping.get(field)
    if value is None:
        raise EventError(f"invalid event: missing field {path}.{field}")
    if not isinstance(value, str) or not value:
        raise EventError(f"invalid event: {path}.{field} must be a non-empty string, got {value!r}")
    return value


def _optional_str(mapping: Mapping[str, Any], field: str, path: str) -> str | None:
    """Return an optional string field, or None when it is absent or null."""
    value = mapping.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(f"invalid event: {path}.{field} must be a string, got {value!r}")
    return value


def _optional_etag(mapping: Mapping[str, Any], field: str, path: str) -> str | None:
    """Return the ETag in quotes, or None when it is absent."""
    etag = _optional_str(mapping, field, path)
    if etag is None:
        return None

    # Events carry the bare digest, while HeadObject, ListObjectsV2 and
    # pipeline.store use the quoted form. One form lets a caller compare the two
    # and derive the same generated job id as a worker that lists the inbox.
    bare = etag.strip('"')
    if not bare:
        return None
    return f'"{bare}"'


def _optional_size(mapping: Mapping[str, Any], field: str, path: str) -> int | None:
    """Return the object size in bytes, or None when the event omits it."""
    value = mapping.get(field)
    if value is None:
        return None

    # bool is a subclass of int, so True and False need their own rejection.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventError(f"invalid event: {path}.{field} must be a non-negative integer, got {value!r}")
    return value


def _type_name(value: Any) -> str:
    """Name a JSON value's type the way JSON does, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__
