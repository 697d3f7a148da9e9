"""Accepting inbox drops: each becomes a queued job or a rejected one.

Acceptance is idempotent, so a worker that dies halfway leaves a drop that the next
worker finishes accepting. The steps, in order: write the normalized spec (or keep the
raw body of a rejected one), add the queue marker, create the status record with
`If-None-Match: *`, and only then delete the inbox object. Until that delete the drop
stays visible in the inbox, so nothing is lost.
"""

import json
import logging
from dataclasses import dataclass

from pipeline.errors import PreconditionFailedError, SpecError
from pipeline.layout import BucketLayout, generated_job_id
from pipeline.lifecycle import QUEUED, REJECTED, StatusBook, new_record
from pipeline.spec import MAX_SPEC_BYTES, SpecPolicy, parse_spec
from pipeline.store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceptance:
    """The outcome of accepting one drop."""

    job_id: str
    state: str
    message: str | None = None


class Intake:
    """Turns inbox drops into jobs."""

    def __init__(self, store: ObjectStore, layout: BucketLayout, policy: SpecPolicy):
        self.store = store
        self.layout = layout
        self.policy = policy
        self.book = StatusBook(store, layout)

    def pending(self, limit: int | None = None) -> list[ObjectInfo]:
        """List drops waiting in the inbox, oldest key first."""
        return [info for info in self.store.list(self.layout.inbox_prefix, max_keys=limit) if self.layout.is_inbox_drop(info.key)]

    def accept(self, info: ObjectInfo) -> Acceptance | None:
        """Accept one drop; return None when the drop vanished (another worker took it)."""
        name = self.layout.inbox_name(info.key)
        requested = self.layout.job_id_from_inbox_key(info.key)
        job_id = requested or generated_job_id(info.key, info.etag)
        source = {"inbox_key": info.key, "etag": info.etag, "original_name": name, "size": info.size}

        existing = self.book.find(job_id)
        if existing is not None and existing.record.get("source", {}).get("etag") != info.etag:
            job_id = generated_job_id(info.key, info.etag)
            message = f"Invalid spec: job id {requested!r} already exists; drop the spec under a new name"
            return self._reject(job_id, info, source, message, self.book.find(job_id))

        problem = _name_problem(name, requested)
        if problem is not None:
            return self._reject(job_id, info, source, problem, existing)
        if info.size > MAX_SPEC_BYTES:
            message = f"Invalid spec: the body is {info.size} bytes; at most {MAX_SPEC_BYTES} are allowed, use inputs_uri for many inputs"
            return self._reject(job_id, info, source, message, existing)

        body = self._read(info)
        if body is None:
            return None
        try:
            spec = parse_spec(body, self.policy)
        except SpecError as exc:
            return self._reject(job_id, info, source, str(exc), existing, body=body)

        return self._queue(job_id, info, source, spec.normalized(), existing)

    def reject_unprocessable(self, info: ObjectInfo, message: str) -> None:
        """Reject a drop that failed in an unexpected way, so it does not block the inbox."""
        job_id = generated_job_id(info.key, info.etag)
        source = {"inbox_key": info.key, "etag": info.etag, "original_name": self.layout.inbox_name(info.key), "size": info.size}
        try:
            self._reject(job_id, info, source, message.replace("\n", " "), self.book.find(job_id))
        except Exception:  # noqa: BLE001 - the drop stays in the inbox for a later try
            log.exception("could not reject %s", info.key)

    def _queue(self, job_id: str, info: ObjectInfo, source: dict, normalized: dict, existing) -> Acceptance:
        spec_body = json.dumps(normalized, indent=1, sort_keys=True, ensure_ascii=False).encode()
        if not self._write_once(self.layout.spec_key(job_id), spec_body):
            message = f"Invalid spec: job id {job_id!r} already exists with another spec; drop the spec under a new name"
            other_id = generated_job_id(info.key, info.etag)
            return self._reject(other_id, info, source, message, self.book.find(other_id))

        self.store.put(self.layout.queue_key(job_id), b"")
        if existing is None:
            record = new_record(job_id, QUEUED, max_attempts=normalized["max_attempts"], source=source)
            self._create_status(record)
        self._remove_drop(info)
        log.info("job queued", extra={"job_id": job_id})
        return Acceptance(job_id, QUEUED)

    def _reject(self, job_id: str, info: ObjectInfo, source: dict, message: str, existing, body: bytes | None = None) -> Acceptance:
        submitted_key = self.layout.submitted_key(job_id)
        if body is None:
            # Copy server-side: an oversized or unread body is kept without loading it here.
            self.store.copy(info.key, submitted_key)
        else:
            self.store.put(submitted_key, body, content_type="application/octet-stream")

        if existing is None:
            record = new_record(job_id, REJECTED, max_attempts=0, source=source, message=message)
            self._create_status(record)
        self._remove_drop(info)
        # The message quotes the offending value, which may be part of the payload: it
        # stays in the status record, readable by the submitter, and out of the logs.
        log.info("job rejected; the reason is in its status record", extra={"job_id": job_id})
        return Acceptance(job_id, REJECTED, message)

    def _create_status(self, record: dict) -> None:
        try:
            self.book.create(record)
        except PreconditionFailedError:
            log.info("another worker accepted the drop first", extra={"job_id": record["job_id"]})

    def _write_once(self, key: str, body: bytes) -> bool:
        """Create an immutable object; True if it now contains exactly `body`."""
        try:
            self.store.put(key, body, content_type="application/json", if_none_match=True)
        except PreconditionFailedError:
            return self.store.get(key).body == body
        return True

    def _read(self, info: ObjectInfo) -> bytes | None:
        from pipeline.errors import ObjectNotFoundError

        try:
            return self.store.get(info.key).body
        except ObjectNotFoundError:
            return None

    def _remove_drop(self, info: ObjectInfo) -> None:
        self.store.delete(info.key)


def _name_problem(name: str, requested: str | None) -> str | None:
    """Explain why a drop's name is unusable as given, or return None."""
    if "/" in name or "\\" in name or ".." in name:
        return f"Invalid spec: the file name {name!r} contains a path separator or '..'; drop it as inbox/NAME.json with NAME made of letters, digits, '.', '_' and '-'"
    if not name.endswith(".json"):
        return f"Invalid spec: the file name {name!r} does not end in .json; rename it to NAME.json"
    return None
