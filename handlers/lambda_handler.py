"""The AWS Lambda entry point: accept inbox drops and run their jobs in time-limited slices.

Lambda calls `handler` with an SQS batch, a direct S3 notification or an EventBridge
"Object Created" event (handlers.events parses all three). For each announced drop the
handler accepts it and runs the job until the job ends or the invocation's time budget
runs out. The worker then releases the job at a chunk boundary with its finished chunks
saved, and the handler sends `{"tokviz": "continue", "job_id": ...}` to the continuation
queue. The invocation that message starts resumes at the first missing chunk.

For an SQS batch the handler returns a partial batch response. A record fails on a store
error, a malformed message, a continuation that could not be sent or an unexpected error.
SQS then redelivers it, and moves it to the dead-letter queue after the queue's
maxReceiveCount deliveries. A job that ends failed, rejected or cancelled is a recorded
outcome, so its record succeeds.
"""

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from handlers.events import EventError, InboxObject, inbox_objects, sqs_batch_response, sqs_record_objects
from pipeline.errors import ConfigError, TokvizError
from pipeline.layout import BucketLayout, generated_job_id, is_valid_job_id
from pipeline.lifecycle import QUEUED, RUNNING
from pipeline.logs import configure_logging
from pipeline.models import ModelCache
from pipeline.store import (
    CONNECT_TIMEOUT_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    READ_TIMEOUT_SECONDS,
    ObjectInfo,
    ObjectStore,
    make_client,
)
from pipeline.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)

CONTINUATION_KEY = "tokviz"
CONTINUATION_VALUE = "continue"
DEFAULT_SAFETY_MARGIN_SECONDS = 60.0

# A job released this many times in a row without finishing a chunk gets no further
# continuation, so a time budget that never fits one chunk cannot invoke the function
# forever. The job stays queued for a polling worker.
MAX_RELEASES_WITHOUT_PROGRESS = 3

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


class RetryableError(TokvizError):
    """An invocation step failed in a way that a redelivery or a Lambda retry can fix."""


@dataclass(frozen=True)
class Continuation:
    """A request to resume a job that an earlier invocation released at a chunk boundary.

    `releases_without_progress` counts the consecutive releases that finished no chunk.
    """

    job_id: str
    releases_without_progress: int = 0

    def body(self) -> str:
        """Serialize the request as the SQS message body."""
        message = {
            CONTINUATION_KEY: CONTINUATION_VALUE,
            "job_id": self.job_id,
            "releases_without_progress": self.releases_without_progress,
        }
        return json.dumps(message)


@dataclass
class JobReport:
    """The outcome of one job in one invocation, as listed in a direct invocation's summary."""

    job_id: str
    state: str | None
    chunks_computed: int = 0
    continued: bool = False


class LambdaApp:
    """Run the work that Lambda events announce, against one bucket.

    One instance lives as long as the Lambda execution environment, so loaded models
    stay warm between invocations. Lambda runs one invocation at a time in an
    environment, which makes it safe to set the worker's deadline per invocation.
    """

    def __init__(
        self,
        store: ObjectStore,
        layout: BucketLayout,
        config: WorkerConfig | None = None,
        models: ModelCache | None = None,
        sqs_client=None,
        continuation_queue_url: str | None = None,
        safety_margin_seconds: float = DEFAULT_SAFETY_MARGIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if safety_margin_seconds < 0:
            raise ConfigError(f"Invalid safety margin {safety_margin_seconds!r} s; use 0 or more seconds")
        if continuation_queue_url and sqs_client is None:
            raise ConfigError("A continuation queue URL was given without an SQS client; pass sqs_client too")

        self.store = store
        self.layout = layout
        self.worker = Worker(store, layout, config, models)
        self.sqs_client = sqs_client
        self.continuation_queue_url = continuation_queue_url or None
        self.safety_margin_seconds = safety_margin_seconds
        self.clock = clock

    def handle(self, event: Any, context: Any) -> dict:
        """Process one Lambda event and return the response Lambda expects for its kind."""
        self.start_invocation(context)

        if is_sqs_event(event):
            return self.handle_sqs_batch(event["Records"])
        return self.handle_direct(event)

    def start_invocation(self, context: Any) -> None:
        """Set the worker's deadline to the invocation's end minus the safety margin.

        `clock` must be the clock that pipeline.worker compares the deadline with,
        which is time.monotonic.
        """
        remaining = remaining_seconds(context)
        if remaining is None:
            log.info("no Lambda context with get_remaining_time_in_millis; jobs run without a deadline")
            self.worker.config.deadline = None
            return

        margin = self.safety_margin_seconds
        if margin >= remaining:
            # A margin that covers the whole invocation would release every job before
            # its first chunk, and each continuation would do the same.
            margin = remaining / 2
            log.warning(
                "safety margin of %.1f s is not below the invocation's remaining %.1f s; using %.1f s; "
                "lower TOKVIZ_SAFETY_MARGIN_SECONDS or raise the function timeout",
                self.safety_margin_seconds, remaining, margin,
            )

        self.worker.config.deadline = self.clock() + remaining - margin
        log.info("invocation started with %.1f s left, %.1f s reserved", remaining, margin, extra=self._worker_ids())

    def handle_sqs_batch(self, records: list) -> dict:
        """Process each SQS record on its own and report the ones worth redelivering."""
        failed_ids = []
        for index, record in enumerate(records):
            # Without a messageId the record cannot be reported alone, so the whole
            # invocation fails and Lambda retries the batch.
            message_id = _require_message_id(record, index)

            try:
                self.handle_sqs_record(record, index)
            except Exception as exc:  # noqa: BLE001 - one bad record must not fail the rest of the batch
                _log_failure(f"SQS message {message_id}", exc)
                failed_ids.append(message_id)

        if failed_ids:
            log.warning("%d of %d SQS messages failed and return to the queue", len(failed_ids), len(records))
        return sqs_batch_response(failed_ids)

    def handle_sqs_record(self, record: Mapping[str, Any], index: int = 0) -> list[JobReport]:
        """Process one SQS record: a continuation request or an S3 or EventBridge event."""
        if record.get("eventSource") != "aws:sqs":
            raise EventError(f"invalid SQS record: Records[{index}].eventSource is {record.get('eventSource')!r}, expected 'aws:sqs'")

        continuation = parse_continuation(record, index)
        if continuation is not None:
            return [self.run_job(continuation.job_id, continuation.releases_without_progress)]

        items = sqs_record_objects(record, self.layout.prefix, index)
        return self.handle_inbox_objects(items)

    def handle_direct(self, event: Any) -> dict:
        """Process an S3 notification or EventBridge event that invoked the function directly.

        Raises EventError for a malformed event and RetryableError when an object failed,
        so that Lambda's retries of asynchronous invocations run the event again.
        """
        items = inbox_objects(event, self.layout.prefix)
        reports = self.handle_inbox_objects(items)
        return {"objects": len(items), "jobs": [asdict(report) for report in reports]}

    def handle_inbox_objects(self, items: list[InboxObject]) -> list[JobReport]:
        """Accept and run each announced drop.

        Raises RetryableError after the loop when any drop failed, so one failure does
        not stop the others.
        """
        reports = []
        failed_keys = []
        for item in items:
            try:
                report = self.handle_inbox_object(item)
            except Exception as exc:  # noqa: BLE001 - the other drops of the event still get their turn
                _log_failure(f"inbox object {item.key!r}", exc)
                failed_keys.append(item.key)
                continue

            if report is not None:
                reports.append(report)

        if failed_keys:
            raise RetryableError(f"{len(failed_keys)} of {len(items)} inbox objects failed: {failed_keys}; see the errors logged for each")
        return reports

    def handle_inbox_object(self, item: InboxObject) -> JobReport | None:
        """Accept one drop and run its job. Return None when the event names another bucket."""
        if item.bucket != self.store.bucket:
            log.warning(
                "ignored %r: the event names bucket %r, but this function serves bucket %r",
                item.key, item.bucket, self.store.bucket,
            )
            return None

        stored = self.store.head(item.key)
        if stored is None:
            return self.resume_taken_drop(item)

        info = ObjectInfo(item.key, stored.size, stored.etag, stored.last_modified)
        acceptance = self.worker.intake.accept(info)
        if acceptance is None:
            return self.resume_taken_drop(item)
        if acceptance.state != QUEUED:
            return JobReport(acceptance.job_id, acceptance.state)

        return self.run_job(acceptance.job_id)

    def resume_taken_drop(self, item: InboxObject) -> JobReport | None:
        """Run the job of a drop that was already accepted, if that job is unfinished.

        The drop is gone after a duplicate delivery, after another worker accepted it,
        or when an earlier invocation crashed after accepting it. Running the job here
        lets a redelivered event finish the last case. Claiming is exclusive, so this is
        harmless when the job is finished or running elsewhere.
        """
        job_id = self.layout.job_id_from_inbox_key(item.key)
        if job_id is None and item.etag is not None:
            job_id = generated_job_id(item.key, item.etag)
        if job_id is None:
            log.info("drop %r is gone and its event carries no ETag, so its job id is unknown", item.key)
            return None

        log.info("drop %r is gone; checking its job", item.key, extra={"job_id": job_id})
        return self.run_job(job_id)

    def run_job(self, job_id: str, releases_without_progress: int = 0) -> JobReport:
        """Run a job until it ends or the deadline passes, and request a continuation when released."""
        # Count chunks with the worker's running total: JobOutcome.chunks_computed stays 0
        # when the deadline ends the run, because _execute raises before returning it.
        chunks_before = self.worker.chunks_computed
        outcome = self.worker.process(job_id)
        if outcome is None:
            return self._report_unclaimed(job_id)

        if outcome.state is None:
            # The lease was lost or the end could not be recorded. A redelivery rereads
            # the status and resumes the job unless another worker holds it.
            raise RetryableError(f"Job {job_id!r} stopped without a recorded state; a redelivery checks it again")

        computed = self.worker.chunks_computed - chunks_before
        report = JobReport(job_id, outcome.state, computed)
        if outcome.state == QUEUED:
            stalled = releases_without_progress + 1 if computed == 0 else 0
            report.continued = self.request_continuation(Continuation(job_id, stalled))
        return report

    def request_continuation(self, continuation: Continuation) -> bool:
        """Send a continuation for a released job. Return False when none was sent."""
        ids = {"job_id": continuation.job_id, **self._worker_ids()}
        if continuation.releases_without_progress > MAX_RELEASES_WITHOUT_PROGRESS:
            log.error(
                "job released %d times in a row without finishing a chunk; no continuation sent, so it stays "
                "queued until a polling worker runs it; raise the function timeout or lower chunk_size",
                continuation.releases_without_progress, extra=ids,
            )
            return False

        if self.continuation_queue_url is None:
            log.warning(
                "job released at a chunk boundary, but TOKVIZ_CONTINUATION_QUEUE_URL is not set; it stays queued "
                "until a polling worker or a later event for it runs it",
                extra=ids,
            )
            return False

        self._send(continuation)
        log.info("continuation sent", extra=ids)
        return True

    def _send(self, continuation: Continuation) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.sqs_client.send_message(QueueUrl=self.continuation_queue_url, MessageBody=continuation.body())
        except (BotoCoreError, ClientError) as exc:
            raise RetryableError(
                f"Failed to send the continuation of job {continuation.job_id!r} to {self.continuation_queue_url}: {exc}; "
                "the job stays queued and a redelivery of this event resumes it"
            ) from exc

    def _report_unclaimed(self, job_id: str) -> JobReport:
        """Report a job this invocation did not claim, raising when a redelivery should try again."""
        snapshot = self.worker.book.find(job_id)
        if snapshot is None:
            log.warning("no status record for job %s; nothing to run", job_id, extra={"job_id": job_id})
            return JobReport(job_id, None)

        # Worker.process also returns None when its claim failed on a store error. A job
        # left claimable here would wait for a polling worker, so the event is retried.
        if snapshot.state == QUEUED or (snapshot.state == RUNNING and snapshot.lease_expired()):
            raise RetryableError(f"Job {job_id!r} is {snapshot.state} but could not be claimed; a redelivery tries again")

        return JobReport(job_id, snapshot.state)

    def _worker_ids(self) -> dict:
        return {"worker_id": self.worker.config.worker_id}


def is_sqs_event(event: Any) -> bool:
    """Return whether a Lambda event is an SQS batch rather than a direct S3 or EventBridge event."""
    if not isinstance(event, Mapping):
        return False

    records = event.get("Records")
    if not isinstance(records, list):
        return False
    return any(isinstance(record, Mapping) and record.get("eventSource") == "aws:sqs" for record in records)


def parse_continuation(record: Mapping[str, Any], index: int = 0) -> Continuation | None:
    """Read a continuation request from an SQS record, or return None for any other message.

    Raises EventError when the body is a continuation request with an invalid value.
    """
    body_text = record.get("body")
    if not isinstance(body_text, str):
        return None

    try:
        body = json.loads(body_text)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, Mapping) or CONTINUATION_KEY not in body:
        return None

    path = f"Records[{index}].body"
    if body[CONTINUATION_KEY] != CONTINUATION_VALUE:
        raise EventError(f"invalid continuation message: {path}.{CONTINUATION_KEY} is {body[CONTINUATION_KEY]!r}, expected {CONTINUATION_VALUE!r}")

    job_id = body.get("job_id")
    if not isinstance(job_id, str) or not is_valid_job_id(job_id):
        raise EventError(f"invalid continuation message: {path}.job_id is {job_id!r}, expected a job id of letters, digits, '.', '_' and '-'")

    count = body.get("releases_without_progress", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise EventError(f"invalid continuation message: {path}.releases_without_progress is {count!r}, expected a non-negative integer")

    return Continuation(job_id, count)


def remaining_seconds(context: Any) -> float | None:
    """Return the invocation's remaining time in seconds, or None without a Lambda context."""
    remaining_millis = getattr(context, "get_remaining_time_in_millis", None)
    if remaining_millis is None:
        return None
    return max(remaining_millis(), 0) / 1000


def make_sqs_client(region: str | None = None):
    """Create an SQS client with the same bounded retries and timeouts as the S3 client.

    boto3 reads AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL for an endpoint other than
    AWS, such as a local moto server.
    """
    import boto3
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"mode": "standard", "total_max_attempts": DEFAULT_MAX_ATTEMPTS},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
    )
    return boto3.session.Session().client("sqs", region_name=region, config=config)


def app_from_env(environ: Mapping[str, str] | None = None) -> LambdaApp:
    """Build the app from the function's environment variables.

    TOKVIZ_BUCKET is required. TOKVIZ_PREFIX, TOKVIZ_ENDPOINT_URL, TOKVIZ_CACHE_DIR,
    TOKVIZ_CONTINUATION_QUEUE_URL, TOKVIZ_ALLOW_LOCAL_MODELS (a boolean word),
    TOKVIZ_MODEL_ALLOWLIST (comma-separated names or glob patterns) and
    TOKVIZ_SAFETY_MARGIN_SECONDS are optional. Raises ConfigError on a missing or
    invalid value.
    """
    environ = os.environ if environ is None else environ
    bucket = environ.get("TOKVIZ_BUCKET", "").strip()
    if not bucket:
        raise ConfigError("TOKVIZ_BUCKET is not set; set it to the name of the job bucket")

    store = ObjectStore(make_client(environ.get("TOKVIZ_ENDPOINT_URL") or None), bucket)
    layout = BucketLayout(environ.get("TOKVIZ_PREFIX", ""))
    config = WorkerConfig(
        allow_local_models=_env_flag(environ, "TOKVIZ_ALLOW_LOCAL_MODELS"),
        model_allowlist=_env_list(environ, "TOKVIZ_MODEL_ALLOWLIST"),
    )

    cache_dir = environ.get("TOKVIZ_CACHE_DIR") or None
    models = ModelCache(cache_dir=Path(cache_dir) if cache_dir else None, store_client=store.client)

    queue_url = environ.get("TOKVIZ_CONTINUATION_QUEUE_URL", "").strip() or None
    sqs_client = make_sqs_client() if queue_url else None
    margin = _env_seconds(environ, "TOKVIZ_SAFETY_MARGIN_SECONDS", DEFAULT_SAFETY_MARGIN_SECONDS)

    return LambdaApp(store, layout, config, models, sqs_client, queue_url, margin)


_app: LambdaApp | None = None


def handler(event: Any, context: Any) -> dict:
    """Handle one Lambda invocation. The image's CMD names this function.

    The app is built on the first invocation and kept in a module global, so warm
    invocations reuse its clients and loaded models.
    """
    global _app
    if _app is None:
        configure_logging(json_lines=True)
        _app = app_from_env()
    return _app.handle(event, context)


def _require_message_id(record: Any, index: int) -> str:
    message_id = record.get("messageId") if isinstance(record, Mapping) else None
    if not isinstance(message_id, str) or not message_id:
        raise EventError(f"invalid SQS event: Records[{index}].messageId is {message_id!r}, so the record cannot be reported alone")
    return message_id


def _log_failure(subject: str, exc: Exception) -> None:
    """Log a caught error: one line for expected kinds, with the traceback for anything else."""
    if isinstance(exc, TokvizError):
        log.error("%s failed: %s", subject, exc)
    else:
        log.exception("%s failed with an unexpected error: %s: %s", subject, type(exc).__name__, exc)


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ConfigError(f"Invalid {name}={value!r}; use one of 1, true, yes, on, 0, false, no, off")


def _env_list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())


def _env_seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default

    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"Invalid {name}={text!r}; use a number of seconds, for example 60") from None
    if not seconds >= 0:
        raise ConfigError(f"Invalid {name}={text!r}; use 0 or more seconds")
    return seconds
