"""The Python client: submit jobs, follow them and read their results.

The client talks only to the bucket, through the same keys a worker uses, so it works
with any worker deployment: local processes, containers or the Lambda handler.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import (
    ConfigError,
    JobFailedError,
    JobNotFoundError,
    JobStateError,
    PreconditionFailedError,
    WaitTimeoutError,
)
from pipeline.layout import TABLES, BucketLayout, is_valid_job_id
from pipeline.lifecycle import CANCELLED, FAILED, QUEUED, RUNNING, SUBMITTED, SUCCEEDED, TERMINAL_STATES, StatusBook, utc_now
from pipeline.spec import SpecPolicy, parse_spec
from pipeline.store import ObjectStore, make_client


def new_job_id() -> str:
    """Return a fresh, sortable job id such as job-20261204-201500-a1b2c3."""
    return f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class Client:
    """Submit and inspect tokviz jobs in one bucket."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, s3_client=None):
        if not bucket:
            raise ConfigError("No bucket given; pass --bucket or set TOKVIZ_BUCKET")
        self.endpoint_url = endpoint_url or os.environ.get("TOKVIZ_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        self.store = ObjectStore(s3_client or make_client(self.endpoint_url), bucket)
        self.layout = BucketLayout(prefix)
        self.book = StatusBook(self.store, self.layout)

    @classmethod
    def from_env(cls) -> "Client":
        """Build a client from TOKVIZ_BUCKET, TOKVIZ_PREFIX and TOKVIZ_ENDPOINT_URL."""
        return cls(os.environ.get("TOKVIZ_BUCKET", ""), os.environ.get("TOKVIZ_PREFIX", ""))

    @property
    def bucket(self) -> str:
        return self.store.bucket

    def submit(self, spec: dict | None = None, *, job_id: str | None = None, **fields) -> str:
        """Validate a spec locally and drop it into the inbox; return the job id.

        `spec` is a dict in the spec format; keyword arguments add or override fields,
        e.g. `client.submit(input_text="Hello", method="saliency")`.
        """
        body = json.dumps({**(spec or {}), **fields}, ensure_ascii=False).encode()
        # Local model paths and allowlists are the worker's policy, checked when it accepts the job.
        parse_spec(body, SpecPolicy(allow_local_models=True))

        job_id = job_id or new_job_id()
        if not is_valid_job_id(job_id):
            raise ConfigError(f"Invalid job id {job_id!r}; use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if self.book.find(job_id) is not None:
            raise JobStateError(f"Job {job_id!r} already exists; choose another id")

        try:
            self.store.put(self.layout.inbox_key(job_id), body, content_type="application/json", if_none_match=True)
        except PreconditionFailedError as exc:
            if not self._inbox_holds(job_id, body):
                raise JobStateError(f"Job {job_id!r} is already waiting in the inbox; choose another id") from exc
        return job_id

    def _inbox_holds(self, job_id: str, body: bytes) -> bool:
        """Tell whether the inbox object is this very body: a retried PUT whose first try landed reads as a conflict."""
        from pipeline.errors import ObjectNotFoundError

        try:
            return self.store.get(self.layout.inbox_key(job_id)).body == body
        except ObjectNotFoundError:
            return False

    def status(self, job_id: str) -> dict:
        """Return the job's status record; a drop not yet accepted reads as `submitted`."""
        snapshot = self.book.find(job_id)
        if snapshot is not None:
            return snapshot.record
        if self.store.exists(self.layout.inbox_key(job_id)):
            return {"job_id": job_id, "state": SUBMITTED, "attempt": 0, "progress": {"done": 0, "total": None}, "message": None}
        raise JobNotFoundError(f"Job {job_id!r} not found in s3://{self.bucket}/{self.layout.prefix}; check the id with 'tokviz list'")

    def list(self, state: str | None = None, limit: int | None = None) -> list[dict]:
        """Return status records of all jobs (newest id first), optionally of one state."""
        records = []
        for info in self.store.list(self.layout.inbox_prefix):
            job_id = self.layout.job_id_from_inbox_key(info.key) or self.layout.inbox_name(info.key)
            records.append({"job_id": job_id, "state": SUBMITTED, "created_at": info.last_modified.isoformat(), "progress": {}})
        for folder in self.store.list_prefixes(self.layout.jobs_prefix):
            job_id = folder.removeprefix(self.layout.jobs_prefix).rstrip("/")
            snapshot = self.book.find(job_id)
            if snapshot is not None:
                records.append(snapshot.record)

        if state is not None:
            records = [record for record in records if record["state"] == state]
        records.sort(key=lambda record: record.get("created_at") or "", reverse=True)
        return records[:limit] if limit else records

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_seconds: float = 1.0,
        on_update: Callable[[dict], None] | None = None,
        raise_on_failure: bool = True,
        progress: bool = False,
    ) -> dict:
        """Poll until the job is terminal; call `on_update` with each new record.

        `progress=True` draws a progress bar of the inputs done, in a terminal or a notebook.
        """
        if progress:
            return self._wait_with_progress_bar(job_id, timeout, poll_seconds, on_update, raise_on_failure)

        deadline = time.monotonic() + timeout if timeout else None
        last = None
        while True:
            record = self.status(job_id)
            if on_update is not None and record != last:
                on_update(record)
            last = record
            if record["state"] in TERMINAL_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"Job {job_id!r} is still {record['state']} after {timeout:g} s; wait longer or check the workers")
            time.sleep(poll_seconds)

        if raise_on_failure and record["state"] != SUCCEEDED:
            raise JobFailedError(f"Job {job_id!r} ended {record['state']}: {record.get('message') or 'no message'}")
        return record

    def _wait_with_progress_bar(self, job_id, timeout, poll_seconds, on_update, raise_on_failure) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(f"{job_id} submitted", total=None)

            def update(record):
                values = record.get("progress") or {}
                bar.update(task, description=f"{job_id} {record['state']}", total=values.get("total"), completed=values.get("done") or 0)
                if on_update is not None:
                    on_update(record)

            return self.wait(job_id, timeout, poll_seconds, update, raise_on_failure)

    def cancel(self, job_id: str) -> dict:
        """Request cancellation: a queued job ends at once, a running one at its next chunk boundary.

        A drop still waiting in the inbox gets the request too: the worker that accepts
        it finds the request before running it and ends it `cancelled`.
        """
        snapshot = self.book.find(job_id)
        if snapshot is None:
            record = self.status(job_id)  # raises JobNotFoundError unless the drop is in the inbox
            self.store.put_json(self.layout.cancel_key(job_id), {"requested_at": utc_now()})
            return record
        if snapshot.state in TERMINAL_STATES:
            raise JobStateError(f"Job {job_id!r} already ended {snapshot.state}; nothing to cancel")

        self.store.put_json(self.layout.cancel_key(job_id), {"requested_at": utc_now()})
        if snapshot.state == QUEUED:
            try:
                self.book.update(snapshot, lambda record: record.update(state=CANCELLED, finished_at=utc_now(), message="cancelled before it started"))
                self.store.delete(self.layout.queue_key(job_id))
            except PreconditionFailedError:
                pass  # A worker claimed it meanwhile, so its heartbeat finds the request instead.
        return self.status(job_id)

    def retry(self, job_id: str) -> dict:
        """Queue a failed or cancelled job again, keeping its earlier errors."""
        snapshot = self.book.find(job_id)
        if snapshot is None:
            state = self.status(job_id)["state"]
            raise JobStateError(f"Job {job_id!r} is {state}; only failed or cancelled jobs can be retried")
        if snapshot.state not in (FAILED, CANCELLED):
            raise JobStateError(f"Job {job_id!r} is {snapshot.state}; only failed or cancelled jobs can be retried")

        if self.store.exists(self.layout.cancel_key(job_id)):
            self.store.delete(self.layout.cancel_key(job_id))
        self.store.put(self.layout.queue_key(job_id), b"")

        def requeue(record):
            record["max_attempts"] = max(record["max_attempts"], record["attempt"] + 1)
            record.update(state=QUEUED, queued_at=utc_now(), finished_at=None, lease=None, message=None)

        self.book.update(snapshot, requeue)
        return self.status(job_id)

    def summary(self, job_id: str) -> dict:
        """Return the committed job's manifest."""
        from pipeline.errors import ObjectNotFoundError

        try:
            return self.store.get_json(self.layout.summary_key(job_id))[0]
        except ObjectNotFoundError as exc:
            state = self.status(job_id)["state"]
            raise JobStateError(f"Job {job_id!r} has no results yet (it is {state}); wait for it with 'tokviz wait {job_id}'") from exc

    def download(self, job_id: str, target: str | Path) -> list[Path]:
        """Copy the job's results and table parts into `target`, never writing outside it."""
        self.summary(job_id)
        root = Path(target).resolve()
        written = []
        for key, relative in self._result_files(job_id):
            path = (root / relative).resolve()
            if not path.is_relative_to(root):
                raise JobStateError(f"Refusing to write {relative!r} outside {root}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.get(key).body)
            written.append(path)
        return written

    def table(self, job_id: str, table: str = "attributions"):
        """Return one table of one committed job as a pandas DataFrame (with job_id)."""
        return self.tables([job_id], table)

    def tables(self, job_ids: list[str], table: str = "attributions"):
        """Return one table for several jobs, concatenated, with a job_id column first."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table not in TABLES:
            raise ConfigError(f"Unknown table {table!r}; use one of {', '.join(TABLES)}")
        parts = []
        for job_id in job_ids:
            for info in self.store.list(self.layout.table_partition_prefix(table, job_id)):
                part = pq.read_table(io.BytesIO(self.store.get(info.key).body))
                parts.append(part.add_column(0, "job_id", pa.array([job_id] * part.num_rows, pa.string())))
        if not parts:
            return pd.DataFrame()
        frame = pa.concat_tables(parts, promote_options="default").to_pandas()
        sort_keys = [name for name in ("job_id", "sequence_idx", "target_idx", "side", "input_idx") if name in frame.columns]
        return frame.sort_values(sort_keys, kind="stable").reset_index(drop=True)

    def filesystem(self):
        """Build a pyarrow S3FileSystem for this client's endpoint, region and credentials.

        pyarrow does not read TOKVIZ_ENDPOINT_URL, so pass this filesystem to
        `pyarrow.dataset` or to `pd.read_parquet(client.table_path(table), filesystem=...)`.
        """
        from pipeline.warehouse import s3_filesystem

        return s3_filesystem(self.store.client, self.endpoint_url)

    def table_path(self, table: str = "attributions") -> str:
        """Return the table's folder as a pyarrow path (`bucket/prefix/tables/<table>/`, no scheme)."""
        from pipeline.warehouse import table_path

        return table_path(self.bucket, self.layout, table)

    def dataset(self, table: str = "attributions"):
        """Return a `pyarrow.dataset.Dataset` over one table of every committed job.

        Parts of jobs without summary.json, such as running ones, are left out. `job_id`
        is a string partition column, and the schema is the union of all parts' columns.
        """
        return self._warehouse().dataset(table)

    def query(self, table: str = "attributions", *, models=None, methods=None, labels: dict | None = None, job_ids=None, columns=None):
        """Return one table of the committed jobs that match every filter, as a pandas DataFrame.

        `models`, `methods` and `job_ids` take a string or a list of strings. `labels`
        is a dict, such as `{"run": "docs"}`, that a job's labels must contain.
        `columns` picks the columns to read. Filters that match nothing give an empty frame.
        """
        return self._warehouse().read(table, models=models, methods=methods, labels=labels, job_ids=job_ids, columns=columns)

    def attribution_matrix(self, job_id: str, sequence_idx: int = 0, side: str | None = None):
        """Return one sequence's scores as an input-token by generated-token DataFrame (see `analysis.attribution_matrix`)."""
        from pipeline.analysis import attribution_matrix

        return attribution_matrix(self.table(job_id, "attributions"), sequence_idx, side)

    def top_tokens(self, job_id: str, k: int = 3, by: str = "step", absolute: bool = False):
        """Return the k most important input tokens per generated token (`by="step"`) or per sequence (`by="sequence"`)."""
        from pipeline.analysis import top_tokens

        return top_tokens(self.table(job_id, "attributions"), k=k, by=by, absolute=absolute)

    def step_scores(self, job_id: str):
        """Return the job's step scores in long form: one row per generated token and step score."""
        from pipeline.analysis import step_score_frame

        return step_score_frame(self.table(job_id, "step_scores"))

    def compare(self, job_ids: list[str], k: int = 3, absolute: bool = False):
        """Compare jobs that attributed the same inputs with different methods (see `analysis.compare_methods`)."""
        from pipeline.analysis import compare_methods

        return compare_methods({job_id: self.table(job_id, "attributions") for job_id in job_ids}, k=k, absolute=absolute)

    def inseq_output(self, job_id: str):
        """Return the job's Inseq FeatureAttributionOutput (aggregated scores)."""
        import tempfile

        import inseq

        body = self.store.get(self.layout.inseq_json_key(job_id)).body
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "attributions.json.gz"
            path.write_bytes(body)
            return inseq.FeatureAttributionOutput.load(str(path), decompress=True)

    def report_html(self, job_id: str) -> str:
        return self.store.get(self.layout.report_key(job_id)).body.decode()

    def _warehouse(self):
        from pipeline.warehouse import Warehouse

        return Warehouse(self.store, self.layout, self.filesystem())

    def _result_files(self, job_id: str) -> list[tuple[str, str]]:
        files = []
        results_prefix = self.layout.results_prefix(job_id)
        for info in self.store.list(results_prefix):
            files.append((info.key, info.key.removeprefix(results_prefix)))
        for table in TABLES:
            partition = self.layout.table_partition_prefix(table, job_id)
            for info in self.store.list(partition):
                files.append((info.key, f"tables/{table}/job_id={job_id}/{info.key.removeprefix(partition)}"))
        return files


ACTIVE_STATES = (SUBMITTED, QUEUED, RUNNING)
