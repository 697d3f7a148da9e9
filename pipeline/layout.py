"""Where everything lives in the bucket.

One bucket contains every job; an optional key prefix lets several deployments share it.
docs/bucket-layout.md lists each key with its writer and meaning.
"""

import hashlib
import re
from dataclasses import dataclass

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TABLES = ("attributions", "step_scores", "sequences")


def is_valid_job_id(job_id: str) -> bool:
    """Tell whether a string may be used as a job id (and so inside keys)."""
    return bool(JOB_ID_PATTERN.fullmatch(job_id)) and ".." not in job_id


def generated_job_id(inbox_key: str, etag: str) -> str:
    """Derive a job id for a dropped file whose name is not a valid id.

    The id depends only on the key and the object's ETag, so every worker that sees
    the same drop derives the same id and only one of them can accept it.
    """
    digest = hashlib.sha256(f"{inbox_key}\n{etag}".encode()).hexdigest()[:16]
    return f"drop-{digest}"


@dataclass(frozen=True)
class BucketLayout:
    """Key names under an optional prefix (normalized to end with '/' when set)."""

    prefix: str = ""

    def __post_init__(self):
        cleaned = self.prefix.strip("/")
        object.__setattr__(self, "prefix", f"{cleaned}/" if cleaned else "")

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}inbox/"

    @property
    def queue_prefix(self) -> str:
        return f"{self.prefix}queue/"

    @property
    def jobs_prefix(self) -> str:
        return f"{self.prefix}jobs/"

    def inbox_key(self, job_id: str) -> str:
        return f"{self.inbox_prefix}{job_id}.json"

    def queue_key(self, job_id: str) -> str:
        return f"{self.queue_prefix}{job_id}"

    def job_prefix(self, job_id: str) -> str:
        return f"{self.jobs_prefix}{job_id}/"

    def spec_key(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}spec.json"

    def status_key(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}status.json"

    def submitted_key(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}submitted.json"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}cancel.json"

    def chunk_key(self, job_id: str, chunk: int) -> str:
        return f"{self.job_prefix(job_id)}chunks/{chunk:05d}.json.gz"

    def chunks_prefix(self, job_id: str) -> str:
        return f"{self.job_prefix(job_id)}chunks/"

    def results_prefix(self, job_id: str) -> str:
        return f"{self.prefix}results/{job_id}/"

    def summary_key(self, job_id: str) -> str:
        return f"{self.results_prefix(job_id)}summary.json"

    def inseq_json_key(self, job_id: str) -> str:
        return f"{self.results_prefix(job_id)}attributions.json.gz"

    def report_key(self, job_id: str) -> str:
        return f"{self.results_prefix(job_id)}report.html"

    def table_prefix(self, table: str) -> str:
        return f"{self.prefix}tables/{table}/"

    def table_partition_prefix(self, table: str, job_id: str) -> str:
        return f"{self.table_prefix(table)}job_id={job_id}/"

    def table_part_key(self, table: str, job_id: str, chunk: int) -> str:
        return f"{self.table_partition_prefix(table, job_id)}part-{chunk:05d}.parquet"

    def job_id_from_inbox_key(self, key: str) -> str | None:
        """Return the id a drop's file name requests, or None when the name is not a valid id."""
        name = key.removeprefix(self.inbox_prefix)
        if "/" in name or not name.endswith(".json"):
            return None
        stem = name.removesuffix(".json")
        return stem if is_valid_job_id(stem) else None

    def is_inbox_drop(self, key: str) -> bool:
        """Tell whether a key is a drop: any object under the inbox but folder markers."""
        return key.startswith(self.inbox_prefix) and len(key) > len(self.inbox_prefix) and not key.endswith("/")

    def inbox_name(self, key: str) -> str:
        """Return a drop's name relative to the inbox, as the user wrote it."""
        return key.removeprefix(self.inbox_prefix)
