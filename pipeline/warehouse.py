"""Cross-job reads of the result tables through pyarrow.dataset over S3.

A `Warehouse` reads one table (attributions, step_scores or sequences) for many jobs
at once, filtered by model, method, labels and job ids. It reads committed jobs only,
those whose `results/<job_id>/summary.json` exists, because a running job's parts
appear in the bucket chunk by chunk before it commits.

pyarrow has its own S3 client. It does not read `TOKVIZ_ENDPOINT_URL`, and with
pyarrow 26.0.1 it ignored `AWS_ENDPOINT_URL` in a test (docs/tables.md), so
`s3_filesystem` passes it the endpoint, region and credentials that the boto3 side
resolved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from urllib.parse import urlparse

from pipeline.errors import ConfigError, StoreError
from pipeline.layout import TABLES, BucketLayout
from pipeline.store import CONNECT_TIMEOUT_SECONDS, DEFAULT_MAX_ATTEMPTS, READ_TIMEOUT_SECONDS, ObjectStore

PARTITION_COLUMN = "job_id"
SORT_COLUMNS = ("job_id", "sequence_idx", "target_idx", "side", "input_idx")


def s3_filesystem(s3_client, endpoint_url: str | None = None):
    """Build a pyarrow S3FileSystem that reaches the same store as `s3_client`.

    The region comes from `s3_client`. The credentials come from boto3's default chain
    (environment, shared files, instance roles), the same chain `store.make_client`
    uses. They are resolved now, so temporary credentials in the result expire with
    their session token: build a new filesystem after that.
    """
    import boto3
    import pyarrow.fs as pafs

    # NOTE: a client built with explicit keys and passed in as `s3_client` does not
    # expose them through a public botocore API, so those keys are not used here.
    credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        raise ConfigError("No AWS credentials found for reading tables with pyarrow; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    frozen = credentials.get_frozen_credentials()

    options = {
        "access_key": frozen.access_key,
        "secret_key": frozen.secret_key,
        "session_token": frozen.token,
        "region": s3_client.meta.region_name,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "request_timeout": READ_TIMEOUT_SECONDS,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=DEFAULT_MAX_ATTEMPTS),
    }
    if endpoint_url:
        options.update(_endpoint_options(endpoint_url))
    return pafs.S3FileSystem(**options)


def check_table(table: str) -> None:
    if table not in TABLES:
        raise ConfigError(f"Unknown table {table!r}; use one of {', '.join(TABLES)}")


def table_path(bucket: str, layout: BucketLayout, table: str) -> str:
    """Return the table's folder as pyarrow names paths: `bucket/prefix/tables/<table>/`, no scheme."""
    check_table(table)
    return f"{bucket}/{layout.table_prefix(table)}"


class Warehouse:
    """One table of every committed job in a bucket, read as a pyarrow dataset."""

    def __init__(self, store: ObjectStore, layout: BucketLayout, filesystem):
        self.store = store
        self.layout = layout
        self.filesystem = filesystem

    def table_path(self, table: str) -> str:
        return table_path(self.store.bucket, self.layout, table)

    def committed_job_ids(self) -> set[str]:
        """Return the ids of the jobs whose summary.json exists, from one listing of results/."""
        results_prefix = f"{self.layout.prefix}results/"
        committed = set()
        for info in self.store.list(results_prefix):
            job_id, _, name = info.key.removeprefix(results_prefix).partition("/")
            if name == "summary.json":
                committed.add(job_id)
        return committed

    def dataset(self, table: str, job_ids: Iterable[str] | None = None):
        """Return a pyarrow dataset over the parts of the committed jobs, or of those in `job_ids`.

        Ids in `job_ids` that are not committed are left out. The schema is the union of
        the parts' schemas with `job_id` (string) first, because step_scores parts of
        jobs with different step scores have different columns. Building it reads the
        footer of every selected part.
        """
        check_table(table)
        selected = self.committed_job_ids()
        if job_ids is not None:
            selected &= set(job_ids)
        return self._dataset_of(table, selected)

    def read(
        self,
        table: str,
        *,
        models: str | Iterable[str] | None = None,
        methods: str | Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        job_ids: str | Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
    ):
        """Return the rows of committed jobs that match every given filter, as a pandas DataFrame.

        `models`, `methods` and `job_ids` each keep rows whose value is one of those
        given. `labels` keeps jobs whose labels contain every given key with that value.
        `columns` picks and orders the columns. Rows are sorted by job_id, sequence_idx,
        target_idx, side and input_idx, as far as those columns are present.
        """
        import pyarrow.dataset as ds

        check_table(table)
        models = _as_list(models, "models")
        methods = _as_list(methods, "methods")
        job_ids = _as_list(job_ids, "job_ids")
        labels = _check_labels(labels)
        columns = _as_list(columns, "columns")

        selected = self.committed_job_ids()
        if job_ids is not None:
            selected &= set(job_ids)
        if labels:
            selected = self._jobs_with_labels(labels, selected)
        dataset = self._dataset_of(table, selected)
        if not dataset.files:
            return _empty_frame(table, columns)
        _check_columns(dataset.schema, columns, table)

        row_filter = None
        for column, values in (("model", models), ("method", methods)):
            if values is not None:
                condition = ds.field(column).isin(values)
                row_filter = condition if row_filter is None else row_filter & condition

        # The sort columns are read even when not requested, so the row order does not
        # depend on the column selection.
        read_columns = None
        if columns is not None:
            read_columns = columns + [name for name in SORT_COLUMNS if name in dataset.schema.names and name not in columns]
        with _reading(table, self.table_path(table)):
            arrow_table = dataset.to_table(columns=read_columns, filter=row_filter)

        frame = _sorted_frame(arrow_table.to_pandas())
        return frame if columns is None else frame[columns]

    def _dataset_of(self, table: str, job_ids: set[str]):
        import pyarrow as pa
        import pyarrow.dataset as ds

        paths = self._part_paths(table, job_ids)
        if not paths:
            return ds.dataset([], schema=_empty_schema(table), format="parquet")

        folder = self.table_path(table)
        partitioning = ds.partitioning(pa.schema([(PARTITION_COLUMN, pa.string())]), flavor="hive")
        with _reading(table, folder):
            dataset = ds.dataset(paths, filesystem=self.filesystem, format="parquet", partitioning=partitioning, partition_base_dir=folder.rstrip("/"))
            schemas = [partitioning.schema] + [fragment.physical_schema for fragment in dataset.get_fragments()]
        return dataset.replace_schema(pa.unify_schemas(schemas))

    def _jobs_with_labels(self, labels: dict[str, str], job_ids: set[str]) -> set[str]:
        """Return the jobs among `job_ids` whose labels contain every pair in `labels`.

        `labels` is stored as a JSON string, which a pyarrow filter cannot test for
        key/value pairs, and a substring match could hit inside another label's value.
        So this reads the small sequences table (one row per input, two columns),
        decodes each job's labels once, and the caller pushes the matching ids down
        into the read of the requested table.
        """
        sequences = self._dataset_of("sequences", job_ids)
        with _reading("sequences", self.table_path("sequences")):
            pairs = sequences.to_table(columns=[PARTITION_COLUMN, "labels"]).group_by([PARTITION_COLUMN, "labels"]).aggregate([])

        matching = set()
        for job_id, stored in zip(pairs[PARTITION_COLUMN].to_pylist(), pairs["labels"].to_pylist(), strict=True):
            job_labels = json.loads(stored or "{}")
            if all(job_labels.get(key) == value for key, value in labels.items()):
                matching.add(job_id)
        return matching

    def _part_paths(self, table: str, job_ids: set[str]) -> list[str]:
        """List the table's part files of `job_ids`, as pyarrow paths, with one listing."""
        table_prefix = self.layout.table_prefix(table)
        paths = []
        for info in self.store.list(table_prefix):
            folder, _, name = info.key.removeprefix(table_prefix).partition("/")
            job_id = folder.removeprefix(f"{PARTITION_COLUMN}=")
            if folder.startswith(f"{PARTITION_COLUMN}=") and job_id in job_ids and name.endswith(".parquet"):
                paths.append(f"{self.store.bucket}/{info.key}")
        return paths


def _endpoint_options(endpoint_url: str) -> dict:
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise ConfigError(f"Invalid endpoint URL {endpoint_url!r} for reading tables with pyarrow; use http(s)://HOST[:PORT] with no path")
    return {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}


def _empty_schema(table: str):
    """Return the table's fixed columns, for a read that selects no parts."""
    import pyarrow as pa

    from pipeline.tables import ATTRIBUTIONS_SCHEMA, SEQUENCES_SCHEMA, step_scores_schema

    fixed = {"attributions": ATTRIBUTIONS_SCHEMA, "step_scores": step_scores_schema(()), "sequences": SEQUENCES_SCHEMA}[table]
    return pa.schema([(PARTITION_COLUMN, pa.string())] + list(fixed)).remove_metadata()


def _empty_frame(table: str, columns: list[str] | None):
    """Return an empty frame with the requested columns, unchecked, because with no parts
    selected the step score columns are unknown."""
    frame = _empty_schema(table).empty_table().to_pandas()
    return frame if columns is None else frame.reindex(columns=columns)


def _as_list(values: str | Iterable[str] | None, argument: str) -> list[str] | None:
    """Return the values as a list, taking a bare string as one value rather than its characters."""
    if values is None:
        return None
    if isinstance(values, str):
        return [values]

    values = list(values)
    wrong = [value for value in values if not isinstance(value, str)]
    if wrong:
        raise ConfigError(f"Invalid {argument} value {wrong[0]!r}; pass strings")
    return values


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str] | None:
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        raise ConfigError(f"Invalid labels filter {labels!r}; pass a dict such as {{'run': 'docs'}}")

    wrong = [key for key, value in labels.items() if not isinstance(key, str) or not isinstance(value, str)]
    if wrong:
        raise ConfigError(f"Invalid labels filter entry {wrong[0]!r}: {labels[wrong[0]]!r}; labels are strings, so pass string keys and values")
    return dict(labels)


def _check_columns(schema, columns: list[str] | None, table: str) -> None:
    if columns is None:
        return

    unknown = [name for name in columns if name not in schema.names]
    if unknown:
        raise ConfigError(f"Unknown column {unknown[0]!r} in the {table} table; choose from {', '.join(schema.names)}")


def _sorted_frame(frame):
    sort_keys = [name for name in SORT_COLUMNS if name in frame.columns]
    if sort_keys:
        frame = frame.sort_values(sort_keys, kind="stable")
    return frame.reset_index(drop=True)


@contextmanager
def _reading(table: str, path: str):
    """Turn pyarrow's S3 errors (OSError) into a StoreError with one line that names the table."""
    try:
        yield
    except OSError as exc:
        detail = " ".join(str(exc).split())
        raise StoreError(f"Failed to read the {table} table at s3://{path}: {detail}; check the endpoint, credentials and bucket") from exc
