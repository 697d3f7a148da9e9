"""Job status records, claims and leases.

`jobs/<job_id>/status.json` is the single source of truth about a job. It is created
with `If-None-Match: *` and every later change is a compare-and-swap with
`If-Match: <etag>`, so two writers can never both win.

Clock rule: a worker never compares its own clock with another worker's. A lease is
expired when the object store's clock, read from the `Date` header of the response that
returned the status record, is more than `lease.seconds` past that record's
`Last-Modified` time, which the store also set. Both times come from the store, so
clock skew between workers cannot expire a live lease. Timestamps inside the record
(`created_at`, `started_at`, ...) are the writer's clock and are for people only.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.errors import JobNotFoundError, ObjectNotFoundError, PreconditionFailedError
from pipeline.layout import BucketLayout
from pipeline.store import ObjectStore

log = logging.getLogger(__name__)

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
REJECTED = "rejected"
CANCELLED = "cancelled"
SUBMITTED = "submitted"
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, REJECTED, CANCELLED})
STATES = (SUBMITTED, QUEUED, RUNNING, SUCCEEDED, FAILED, REJECTED, CANCELLED)
DEFAULT_LEASE_SECONDS = 60


def utc_now() -> str:
    """Return the current UTC time as an ISO 8601 string with a Z suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_record(job_id: str, state: str, *, max_attempts: int, source: dict, message: str | None = None) -> dict:
    """Build the first status record of a job."""
    now = utc_now()
    return {
        "job_id": job_id,
        "state": state,
        "attempt": 0,
        "max_attempts": max_attempts,
        "created_at": now,
        "updated_at": now,
        "queued_at": now if state == QUEUED else None,
        "started_at": None,
        "finished_at": now if state in TERMINAL_STATES else None,
        "worker_id": None,
        "lease": None,
        "progress": {"done": 0, "total": None, "unit": "inputs", "chunks_done": 0, "chunks_total": None},
        "message": message,
        "errors": [],
        "source": source,
        "write_id": uuid.uuid4().hex,
    }


@dataclass
class StatusSnapshot:
    """A status record with the ETag and store times it was read with."""

    record: dict
    etag: str
    last_modified: datetime | None
    server_time: datetime | None

    @property
    def state(self) -> str:
        return self.record["state"]

    def lease_expired(self) -> bool:
        """Apply the clock rule in the module docstring."""
        lease = self.record.get("lease")
        if not lease:
            return True
        if self.last_modified is None or self.server_time is None:
            return False
        age = (self.server_time - self.last_modified).total_seconds()
        return age > lease["seconds"]


class StatusBook:
    """Reads and conditionally writes status records."""

    def __init__(self, store: ObjectStore, layout: BucketLayout):
        self.store = store
        self.layout = layout

    def read(self, job_id: str) -> StatusSnapshot:
        try:
            stored = self.store.get(self.layout.status_key(job_id))
        except ObjectNotFoundError as exc:
            raise JobNotFoundError(f"Job {job_id!r} not found in s3://{self.store.bucket}/{self.layout.prefix}; check the id with 'tokviz list'") from exc
        return StatusSnapshot(stored.json(), stored.etag, stored.last_modified, stored.server_time)

    def find(self, job_id: str) -> StatusSnapshot | None:
        try:
            return self.read(job_id)
        except JobNotFoundError:
            return None

    def create(self, record: dict) -> str:
        """Create a record; raise PreconditionFailedError if the job already exists."""
        key = self.layout.status_key(record["job_id"])
        try:
            return self.store.put_json(key, record, if_none_match=True)
        except PreconditionFailedError:
            if self._our_write_landed(record):
                return self.read(record["job_id"]).etag
            raise

    def update(self, snapshot: StatusSnapshot, change: Callable[[dict], None]) -> StatusSnapshot:
        """Apply `change` to a copy of the record and write it only if unchanged since read.

        Raises PreconditionFailedError when another writer got there first; the caller
        rereads and decides again.
        """
        record = _copy(snapshot.record)
        change(record)
        record["updated_at"] = utc_now()
        record["write_id"] = uuid.uuid4().hex
        key = self.layout.status_key(record["job_id"])

        try:
            etag = self.store.put_json(key, record, if_match=snapshot.etag)
        except PreconditionFailedError:
            # A retried PUT whose first try landed reports 412 on the retry: check.
            if not self._our_write_landed(record):
                raise
            return self.read(record["job_id"])
        return StatusSnapshot(record, etag, None, None)

    def _our_write_landed(self, record: dict) -> bool:
        current = self.find(record["job_id"])
        return current is not None and current.record.get("write_id") == record["write_id"]


class Lease:
    """A worker's hold on a running job, renewed by a heartbeat thread.

    The heartbeat renews the lease with a conditional write and checks for a
    cancellation request. When a renewal finds the record changed by someone else, the
    lease is lost: `check()` then raises and the job's results are never committed.
    """

    def __init__(self, book: StatusBook, snapshot: StatusSnapshot, worker_id: str, seconds: int):
        self.book = book
        self.snapshot = snapshot
        self.worker_id = worker_id
        self.seconds = seconds
        self.token = snapshot.record["lease"]["token"]
        self.lost_reason: str | None = None
        self.cancel_requested = False
        # Monotonic time of this worker's last successful write of the record; the claim
        # that created this lease was one.
        self.renewed_at = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.snapshot.record["job_id"]

    @property
    def attempt(self) -> int:
        return self.snapshot.record["attempt"]

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.seconds)

    def update(self, change: Callable[[dict], None]) -> None:
        """Change the record while still holding the lease, renewing it in the same write."""
        with self._lock:
            self._ensure_held()

            def renew_and_change(record):
                record["lease"]["renewed_at"] = utc_now()
                change(record)

            try:
                self.snapshot = self.book.update(self.snapshot, renew_and_change)
            except PreconditionFailedError:
                self._mark_lost_if_taken()
                self._ensure_held()
                self.snapshot = self.book.update(self.snapshot, renew_and_change)
            self.renewed_at = time.monotonic()

    def renew(self) -> None:
        self.update(lambda record: None)

    def renew_unless_fresh(self, max_age: float) -> None:
        """Renew unless this worker's last successful write of the record is under `max_age` seconds old."""
        if time.monotonic() - self.renewed_at >= max_age:
            self.renew()

    def check(self) -> None:
        """Raise if the lease was lost or the job was cancelled; call at chunk boundaries."""
        from pipeline.errors import JobCancelledError

        self._ensure_held()
        if self.cancel_requested:
            raise JobCancelledError(f"Job {self.job_id!r} was cancelled")

    def _ensure_held(self) -> None:
        from pipeline.errors import LeaseLostError

        if self.lost_reason is not None:
            raise LeaseLostError(f"Lease on job {self.job_id!r} lost: {self.lost_reason}")

    def _mark_lost_if_taken(self) -> None:
        current = self.book.read(self.job_id)
        lease = current.record.get("lease") or {}
        if current.state != RUNNING or lease.get("token") != self.token:
            self.lost_reason = f"the job is now {current.state} under lease owner {lease.get('owner')!r}"
            log.warning("lease lost", extra={"job_id": self.job_id, "worker_id": self.worker_id, "attempt": self.attempt})
            return
        self.snapshot = current

    def _beat(self) -> None:
        interval = max(self.seconds / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                self.cancel_requested = self.cancel_requested or self.book.store.exists(self.book.layout.cancel_key(self.job_id))
                self.renew()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive store hiccups
                log.warning(
                    "heartbeat failed: %s", exc,
                    extra={"job_id": self.job_id, "worker_id": self.worker_id, "attempt": self.attempt},
                )
                if self.lost_reason is not None:
                    return


def new_lease(worker_id: str, seconds: int) -> dict:
    """Build the lease part of a status record."""
    return {"owner": worker_id, "token": uuid.uuid4().hex, "seconds": seconds, "renewed_at": utc_now()}


def _copy(record: dict) -> dict:
    import copy

    return copy.deepcopy(record)
