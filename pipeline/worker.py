"""The worker: accepts drops, claims queued jobs and runs them to a terminal state.

`Worker.poll_once` is one pass over the inbox and the queue; the polling loop in
`handlers.worker` and the Lambda handler both drive it. A job's failure never escapes
`run_claimed`: it ends the job `failed`, `rejected` or `cancelled` and the worker moves on.
"""

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.batching import BatchMember, JobBatcher, group_members
from pipeline.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    AttributionError,
    JobCancelledError,
    LeaseLostError,
    ModelLoadError,
    PreconditionFailedError,
    SpecError,
    StoreError,
)
from pipeline.inputs import load_inputs
from pipeline.intake import Intake
from pipeline.layout import BucketLayout
from pipeline.lifecycle import (
    CANCELLED,
    DEFAULT_LEASE_SECONDS,
    FAILED,
    QUEUED,
    REJECTED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Lease,
    StatusBook,
    StatusSnapshot,
    new_lease,
    utc_now,
)
from pipeline.models import ModelCache
from pipeline.results import ResultWriter, build_summary
from pipeline.runner import ChunkAttribution, attribute_inputs
from pipeline.spec import JobSpec, SpecPolicy
from pipeline.store import ObjectStore
from pipeline.tables import TableContext, build_chunk_tables

log = logging.getLogger(__name__)

# A lease written longer ago than this is renewed before the job commits.
COMMIT_RENEWAL_SECONDS = 1.0

# Specs are read for this many batches' worth of queued jobs at a time.
PLAN_WINDOW_BATCHES = 4


@dataclass
class WorkerConfig:
    """Operator settings of one worker."""

    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    allow_local_models: bool = False
    model_allowlist: tuple[str, ...] = ()
    max_inputs: int = 1000
    deadline: float | None = None
    # Maximum number of small compatible jobs whose inputs share Inseq calls (see pipeline.batching). 1 disables batching.
    max_batch_jobs: int = 8


@dataclass
class JobOutcome:
    """The outcome of one claimed job on this worker."""

    job_id: str
    state: str | None
    chunks_computed: int = 0


class Worker:
    """Accepts and runs jobs from one bucket."""

    def __init__(self, store: ObjectStore, layout: BucketLayout, config: WorkerConfig | None = None, models: ModelCache | None = None):
        self.store = store
        self.layout = layout
        self.config = config or WorkerConfig()
        self.models = models or ModelCache(store_client=store.client)
        self.book = StatusBook(store, layout)
        self.intake = Intake(store, layout, self.policy())
        self.batcher = JobBatcher()
        # Specs read by the batch planner in this pass, reused by the job's own run.
        # A job's spec.json is written once and never changes, so the copy stays valid.
        self._planned_specs: dict[str, JobSpec] = {}
        self.chunks_computed = 0

    def policy(self) -> SpecPolicy:
        return SpecPolicy(
            bucket=self.store.bucket,
            allow_local_models=self.config.allow_local_models,
            model_allowlist=self.config.model_allowlist,
            max_inputs=self.config.max_inputs,
        )

    def poll_once(self, max_jobs: int | None = None, stop: threading.Event | None = None) -> list[JobOutcome]:
        """Accept every waiting drop, then run claimable jobs, up to `max_jobs`.

        Small compatible jobs run as one batch when batching is on. A set `stop` event
        ends the pass between jobs or batches.
        """
        self._accept_drops()
        self._planned_specs.clear()

        outcomes = []
        for unit in self._plan_runs(self.queued_job_ids()):
            room = None if max_jobs is None else max_jobs - len(outcomes)
            if (room is not None and room <= 0) or (stop is not None and stop.is_set()):
                break
            if len(unit) > 1:
                outcomes.extend(self.process_batch(unit[:room]))
                continue
            outcome = self.process(unit[0].job_id)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _accept_drops(self) -> None:
        for info in self.intake.pending():
            try:
                self.intake.accept(info)
            except StoreError as exc:
                log.error("failed to accept %s: %s", info.key, exc, extra={"worker_id": self.config.worker_id})
            except Exception as exc:  # noqa: BLE001 - one strange drop must not stop the worker
                log.exception("unexpected error accepting %s", info.key, extra={"worker_id": self.config.worker_id})
                self.intake.reject_unprocessable(info, f"Invalid spec: the drop could not be processed ({type(exc).__name__}: {exc}); check its encoding and structure")

    def queued_job_ids(self) -> list[str]:
        return [info.key.removeprefix(self.layout.queue_prefix) for info in self.store.list(self.layout.queue_prefix)]

    def _plan_runs(self, job_ids: list[str]):
        """Yield run units in queue order: one job, or a group of jobs to batch.

        Specs are read a window at a time, so a long queue is not read in full before
        the first job runs. A Lambda invocation's deadline turns batching off, because
        a batch cannot stop at a chunk boundary of one of its jobs.
        """
        if self.config.max_batch_jobs <= 1 or self.config.deadline is not None:
            yield from ([BatchMember(job_id, None)] for job_id in job_ids)
            return

        window = self.config.max_batch_jobs * PLAN_WINDOW_BATCHES
        for start in range(0, len(job_ids), window):
            members = [BatchMember(job_id, self._read_spec(job_id)) for job_id in job_ids[start : start + window]]
            yield from group_members(members, self.config.max_batch_jobs, self.batcher.unbatchable_keys())

    def _read_spec(self, job_id: str) -> JobSpec | None:
        """Return a queued job's spec, or None when it cannot be read, so that the job runs alone."""
        try:
            spec = JobSpec.model_validate(self.store.get_json(self.layout.spec_key(job_id))[0])
        except Exception as exc:  # noqa: BLE001 - the job's own run reports a bad or missing spec
            log.debug("spec not read for batching: %s", exc, extra={"job_id": job_id, "worker_id": self.config.worker_id})
            return None
        self._planned_specs[job_id] = spec
        return spec

    def process_batch(self, members: list[BatchMember]) -> list[JobOutcome]:
        """Claim jobs that share a batch key, attribute their inputs together, then finish each job on its own.

        Each job keeps its own lease, heartbeat, cancellation check and commit. A job
        without a batched result (the batch failed, or its result was not kept) runs alone.
        """
        leases = self._claim_each([member.job_id for member in members])
        if len(leases) < 2:
            return [self.run_claimed(lease) for lease in leases]

        for lease in leases:
            lease.start_heartbeat()
        claimed = [member for member in members if member.job_id in {lease.job_id for lease in leases}]
        chunks = self._attribute_batch(claimed)
        return [self._run_heartbeating(lease, chunks.get(lease.job_id)) for lease in leases]

    def _claim_each(self, job_ids: list[str]) -> list[Lease]:
        leases = []
        for job_id in job_ids:
            try:
                lease = self.claim(job_id)
            except StoreError as exc:
                log.warning("claim failed: %s", exc, extra={"job_id": job_id, "worker_id": self.config.worker_id})
                continue
            if lease is not None:
                leases.append(lease)
        return leases

    def _attribute_batch(self, members: list[BatchMember]) -> dict[str, ChunkAttribution]:
        """Return the batched chunk results by job id, or an empty dict when the batch failed as a whole."""
        spec = members[0].spec
        job_ids = [member.job_id for member in members]
        started = time.perf_counter()
        try:
            loaded = self.models.get(spec.model, spec.device)
            chunks = self.batcher.compute(loaded, members)
        except Exception as exc:  # noqa: BLE001 - every job then runs alone and reports its own error
            log.warning("batch of jobs %s failed, so each runs alone: %s: %s", job_ids, type(exc).__name__, exc, extra={"worker_id": self.config.worker_id})
            return {}
        log.info("batch of jobs %s attributed in %.2f s, and %d keep the batched result", job_ids, time.perf_counter() - started, len(chunks), extra={"worker_id": self.config.worker_id})
        return chunks

    def process(self, job_id: str) -> JobOutcome | None:
        """Claim a job if it is free and run it; return None when not claimed."""
        try:
            lease = self.claim(job_id)
        except StoreError as exc:
            log.warning("claim failed: %s", exc, extra={"job_id": job_id, "worker_id": self.config.worker_id})
            return None
        if lease is None:
            return None
        return self.run_claimed(lease)

    def claim(self, job_id: str) -> Lease | None:
        """Take the job with a conditional write, or return None if it is not ours to take."""
        snapshot = self.book.find(job_id)
        if snapshot is None:
            return None
        if snapshot.state in TERMINAL_STATES:
            self._drop_queue_marker(job_id)
            return None
        if snapshot.state == RUNNING and not snapshot.lease_expired():
            return None
        # Only a job that ran before can have committed: a crash between writing
        # summary.json and recording success leaves it running or queued with attempts.
        if snapshot.record["attempt"] > 0 and self.store.exists(self.layout.summary_key(job_id)):
            self._finish_committed(snapshot)
            return None
        if self.store.exists(self.layout.cancel_key(job_id)):
            self._end(snapshot, CANCELLED, "cancelled before it started")
            return None

        next_attempt = snapshot.record["attempt"] + 1
        if next_attempt > snapshot.record["max_attempts"]:
            self._end(snapshot, FAILED, f"gave up after {snapshot.record['max_attempts']} attempts; see errors for each attempt", _lease_expiry_error)
            return None

        lease_record = new_lease(self.config.worker_id, self.config.lease_seconds)

        planned = self._planned_specs.get(job_id)

        def take(record):
            _lease_expiry_error(record)
            record.update(state=RUNNING, attempt=next_attempt, worker_id=self.config.worker_id, lease=lease_record, started_at=utc_now(), message=None)
            if planned is not None and not _may_have_chunks(record):
                _count_inline_inputs(record, planned)

        try:
            taken = self.book.update(snapshot, take)
        except PreconditionFailedError:
            return None
        log.info("job claimed", extra=self._ids(job_id, next_attempt))
        return Lease(self.book, taken, self.config.worker_id, self.config.lease_seconds)

    def run_claimed(self, lease: Lease) -> JobOutcome:
        """Run a claimed job to a terminal state; no job error escapes."""
        lease.start_heartbeat()
        return self._run_heartbeating(lease, None)

    def _run_heartbeating(self, lease: Lease, precomputed: ChunkAttribution | None) -> JobOutcome:
        """Run a claimed job whose heartbeat already runs, and stop the heartbeat at the end."""
        job_id = lease.job_id
        ids = self._ids(job_id, lease.attempt)
        outcome = JobOutcome(job_id, None)
        try:
            log.info("job started", extra=ids)
            outcome.chunks_computed = self._execute(lease, precomputed)
            outcome.state = SUCCEEDED
            log.info("job finished", extra=ids)
        except LeaseLostError as exc:
            log.warning("job abandoned: %s", exc, extra=ids)
        except _TimeBudgetUsed as exc:
            log.info("time budget used up; job released for a continuation", extra=ids)
            outcome.chunks_computed = exc.computed
            outcome.state = self._release(lease, None)
        except JobCancelledError:
            outcome.state = self._end_leased(lease, CANCELLED, "cancelled while running")
        except SpecError as exc:
            outcome.state = self._end_leased(lease, REJECTED, str(exc))
        except (AttributionError, ModelLoadError) as exc:
            outcome.state = self._end_leased(lease, FAILED, str(exc), error=True)
        except (AccessDeniedError, BucketNotFoundError) as exc:
            # Another attempt would meet the same permission or missing bucket, so fail now.
            log.error("job failed on a permanent object store error: %s", exc, extra=ids)
            outcome.state = self._end_leased(lease, FAILED, str(exc), error=True)
        except StoreError as exc:
            log.error("job interrupted by the object store: %s", exc, extra=ids)
            outcome.state = self._release(lease, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad job must never take the worker down
            log.exception("job crashed", extra=ids)
            outcome.state = self._end_leased(lease, FAILED, f"Internal error: {type(exc).__name__}: {exc}", error=True)
        finally:
            lease.stop_heartbeat()
        return outcome

    def _execute(self, lease: Lease, precomputed: ChunkAttribution | None = None) -> int:
        """Compute and write each unfinished chunk, then commit. `precomputed` is a one-chunk job's batched result."""
        job_id = lease.job_id
        spec = self._planned_specs.pop(job_id, None) or JobSpec.model_validate(self.store.get_json(self.layout.spec_key(job_id))[0])
        writer = ResultWriter(self.store, self.layout, job_id)
        started = time.perf_counter()

        inputs = load_inputs(spec, self.store)
        chunk_starts = list(range(0, len(inputs), spec.chunk_size))
        finished = writer.finished_chunks() if _may_have_chunks(lease.snapshot.record) else {}
        _check_inputs_unchanged(lease.snapshot.record, inputs, spec)
        if _progress_differs(lease.snapshot.record, inputs, len(chunk_starts), finished):
            lease.update(lambda record: _start_progress(record, inputs, len(chunk_starts), finished))

        load_started = time.perf_counter()
        loaded = self.models.get(spec.model, spec.device)
        load_seconds = time.perf_counter() - load_started
        context = TableContext(spec.model, spec.method, dict(spec.labels), tuple(spec.step_scores))
        computed = 0

        for index, first in enumerate(chunk_starts):
            if index in finished:
                continue
            lease.check()
            self._stop_if_out_of_time(lease, computed)

            part = inputs.slice(first, first + spec.chunk_size)
            if precomputed is not None and len(chunk_starts) == 1:
                result = precomputed
            else:
                result = attribute_inputs(loaded, spec, part.texts, part.generated_texts)
            tables = build_chunk_tables(result.aggregated, loaded.tokenizer, context, first, index, part.texts, result.seconds)

            lease.check()
            finished[index] = writer.write_chunk(index, first, tables, result.aggregated, result.seconds, spec.outputs)
            computed += 1
            self.chunks_computed += 1
            done = sum(chunk.sequences for chunk in finished.values())
            lease.update(lambda record, done=done: record["progress"].update(done=done, chunks_done=len(finished)))

        lease.check()
        files = writer.write_final_outputs(len(chunk_starts), spec.outputs)
        self._commit(lease, spec, writer, finished, files, load_seconds, started)
        return computed

    def _commit(self, lease: Lease, spec: JobSpec, writer: ResultWriter, finished: dict, files: dict, load_seconds: float, started: float) -> None:
        lease.check()
        record = lease.snapshot.record
        for name, keys in writer.table_keys(finished).items():
            files.update({key: None for key in keys})
        timings = {
            "queued_at": record.get("queued_at"),
            "started_at": record.get("started_at"),
            "committed_at": utc_now(),
            "model_load_seconds": round(load_seconds, 3),
            "attribution_seconds": round(sum(chunk.seconds for chunk in finished.values()), 3),
            "run_seconds": round(time.perf_counter() - started, 3),
        }
        summary = build_summary(lease.job_id, record, spec.normalized(), finished, files, timings, _versions())

        # The heartbeat notices a takeover only at its next beat, so make sure the lease
        # was renewed moments ago: after a successful renewal no other worker can take
        # the job for a whole lease. The progress write after the last chunk usually did it.
        lease.renew_unless_fresh(COMMIT_RENEWAL_SECONDS)
        lease.check()
        writer.commit(summary)

        def succeed(record):
            record.update(state=SUCCEEDED, finished_at=utc_now(), lease=None, message=None)

        lease.update(succeed)
        self._drop_queue_marker(lease.job_id)

    def _stop_if_out_of_time(self, lease: Lease, computed: int) -> None:
        if self.config.deadline is not None and time.monotonic() >= self.config.deadline:
            raise _TimeBudgetUsed(lease.job_id, computed)

    def _end_leased(self, lease: Lease, state: str, message: str, error: bool = False) -> str | None:
        def finish(record):
            if error:
                record["errors"].append({"attempt": record["attempt"], "at": utc_now(), "message": message})
            record.update(state=state, finished_at=utc_now(), lease=None, message=message)

        try:
            lease.update(finish)
        except (LeaseLostError, StoreError) as exc:
            log.warning("could not record the end of the job: %s", exc, extra=self._ids(lease.job_id, lease.attempt))
            return None
        self._drop_queue_marker(lease.job_id)
        # The message may quote the job's inputs, so it stays in the status record only.
        log.info("job %s", state, extra=self._ids(lease.job_id, lease.attempt))
        return state

    def _release(self, lease: Lease, message: str | None) -> str | None:
        """Give the job back to the queue so another attempt (or invocation) continues it."""

        def requeue(record):
            if message is not None:
                record["errors"].append({"attempt": record["attempt"], "at": utc_now(), "message": message})
            else:
                record["attempt"] -= 1  # a planned hand-over is not a failed attempt
            record.update(state=QUEUED, lease=None, queued_at=utc_now())

        try:
            lease.update(requeue)
        except (LeaseLostError, StoreError) as exc:
            log.warning("could not release the job: %s", exc, extra=self._ids(lease.job_id, lease.attempt))
            return None
        return QUEUED

    def _end(self, snapshot: StatusSnapshot, state: str, message: str, before: Callable[[dict], None] | None = None) -> None:
        def finish(record):
            if before is not None:
                before(record)
            record.update(state=state, finished_at=utc_now(), lease=None, message=message)

        try:
            self.book.update(snapshot, finish)
        except PreconditionFailedError:
            return
        self._drop_queue_marker(snapshot.record["job_id"])
        log.info("job %s: %s", state, message, extra=self._ids(snapshot.record["job_id"], snapshot.record["attempt"]))

    def _finish_committed(self, snapshot: StatusSnapshot) -> None:
        """Record success for a job whose summary exists but whose status records another state."""

        def succeed(record):
            record.update(state=SUCCEEDED, finished_at=utc_now(), lease=None, message=None)

        try:
            self.book.update(snapshot, succeed)
        except PreconditionFailedError:
            return
        self._drop_queue_marker(snapshot.record["job_id"])

    def _drop_queue_marker(self, job_id: str) -> None:
        try:
            self.store.delete(self.layout.queue_key(job_id))
        except StoreError as exc:
            log.warning("could not remove the queue marker: %s", exc, extra={"job_id": job_id})

    def _ids(self, job_id: str, attempt: int) -> dict:
        return {"job_id": job_id, "attempt": attempt, "worker_id": self.config.worker_id}


def _may_have_chunks(record: dict) -> bool:
    """Tell whether an earlier attempt or invocation may have written chunks, so they must be listed.

    A first attempt starts from nothing. A planned hand-over keeps the attempt number
    but records its finished chunks in the progress first.
    """
    return record["attempt"] > 1 or (record["progress"].get("chunks_done") or 0) > 0


def _check_inputs_unchanged(record: dict, inputs, spec: JobSpec) -> None:
    """Fail a resumed job whose inputs object was replaced: its finished chunks came from the old rows."""
    pinned = record["progress"].get("inputs_etag")
    if pinned is not None and inputs.source_etag is not None and pinned != inputs.source_etag:
        raise AttributionError(
            f"The inputs object {spec.inputs_uri} changed since this job started (ETag {pinned} is now {inputs.source_etag}); "
            "submit a new job for the new inputs"
        )


def _start_progress(record: dict, inputs, chunks_total: int, finished: dict) -> None:
    record["progress"].update(_progress_values(inputs, chunks_total, finished))


def _progress_values(inputs, chunks_total: int, finished: dict) -> dict:
    values = {"total": len(inputs), "chunks_total": chunks_total, "chunks_done": len(finished), "done": sum(chunk.sequences for chunk in finished.values())}
    if inputs.source_etag is not None:
        values["inputs_etag"] = inputs.source_etag
    return values


def _progress_differs(record: dict, inputs, chunks_total: int, finished: dict) -> bool:
    progress = record["progress"]
    return any(progress.get(name) != value for name, value in _progress_values(inputs, chunks_total, finished).items())


def _count_inline_inputs(record: dict, spec: JobSpec) -> None:
    """Set the progress totals in the claim's own write when the spec lists its inputs, saving a write."""
    if spec.inputs_uri is not None:
        return
    total = len(spec.texts())
    record["progress"].update(total=total, chunks_total=-(-total // spec.chunk_size), chunks_done=0, done=0)


def _lease_expiry_error(record: dict) -> None:
    """Record, in the errors list, that the running attempt's worker stopped renewing its lease."""
    if record["state"] == RUNNING:
        owner = (record.get("lease") or {}).get("owner")
        record["errors"].append({"attempt": record["attempt"], "at": utc_now(), "message": f"lease expired: worker {owner!r} stopped renewing it"})


class _TimeBudgetUsed(Exception):
    """The invocation's deadline arrived at a chunk boundary."""

    def __init__(self, job_id: str, computed: int):
        super().__init__(job_id)
        self.computed = computed


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("tokviz", "inseq", "transformers", "torch", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
