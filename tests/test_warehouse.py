"""Cross-job queries through pyarrow.dataset over HTTP against the moto server process.

The query tests only read, so they share one bucket that a worker fills once for the
module: five committed jobs with different models, methods, labels and step scores,
under a key prefix, plus the parts of a job that has not committed yet. Every expected
frame comes from `Client.tables`, which reads the parts one by one through boto3.
"""

import os
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline.client import Client
from pipeline.errors import BucketNotFoundError, ConfigError
from pipeline.layout import TABLES, BucketLayout
from pipeline.store import ObjectStore, make_client

PREFIX = "lab"
IN_PROGRESS = "in-progress"
TEXTS = ["The capital of France is", "A cat sat on"]
ALL_JOBS = ["20240101", "bart-docs", "ixg-docs", "sal-bench", "sal-docs"]


def job_specs(gpt2: str, bart: str) -> dict[str, dict]:
    """Return the shared bucket's jobs by id.

    `sal-bench` has a `rerun` label whose value is `docs`, so a filter that looked for
    "docs" anywhere in the labels JSON would wrongly select it. `20240101` is all
    digits, so a partition column inferred as a number would turn its id into an
    integer, and its chunk_size of 1 gives it two parts per table. The random BART
    model may end its generation at once, so `bart-docs` forces its target text.
    """
    specs = {
        "sal-docs": dict(model=gpt2, method="saliency", input_texts=TEXTS, step_scores=["probability"], labels={"run": "docs", "team": "a"}),
        "ixg-docs": dict(model=gpt2, method="input_x_gradient", input_texts=TEXTS[:1], step_scores=["probability", "entropy"], labels={"run": "docs"}),
        "sal-bench": dict(model=gpt2, method="saliency", input_texts=TEXTS[1:], labels={"run": "bench", "rerun": "docs"}),
        "bart-docs": dict(model=bart, method="saliency", input_texts=TEXTS[:1], generated_texts=["Paris is nice"], step_scores=["entropy"], labels={"run": "docs", "team": "b"}),
        "20240101": dict(model=gpt2, method="saliency", input_texts=TEXTS, chunk_size=1),
    }
    return {job_id: {**spec, "generation_args": {"max_new_tokens": 3}} for job_id, spec in specs.items()}


def copy_parts(store: ObjectStore, layout: BucketLayout, source_job: str, target_job: str) -> int:
    """Copy a job's table parts into another job's partitions; return how many were copied.

    The copies stand for a job that is still running: its chunks' parts are written,
    but its summary.json is not.
    """
    copied = 0
    for table in TABLES:
        for info in store.list(layout.table_partition_prefix(table, source_job)):
            name = info.key.rsplit("/", 1)[-1]
            store.copy(info.key, f"{layout.table_partition_prefix(table, target_job)}{name}")
            copied += 1
    return copied


@pytest.fixture(scope="module")
def shared(moto_server, causal_model_dir, seq2seq_model_dir, model_cache):
    """Fill one bucket with the jobs of `job_specs` and one uncommitted job's parts."""
    from pipeline.worker import Worker, WorkerConfig

    bucket = f"warehouse-{os.getpid()}"
    moto_server.create_bucket(bucket)
    store = ObjectStore(make_client(moto_server.endpoint_url), bucket)
    layout = BucketLayout(PREFIX)
    client = Client(bucket, prefix=PREFIX, endpoint_url=moto_server.endpoint_url)

    specs = job_specs(str(causal_model_dir), str(seq2seq_model_dir))
    for job_id, spec in specs.items():
        client.submit(spec, job_id=job_id)
    Worker(store, layout, WorkerConfig(allow_local_models=True, lease_seconds=30), model_cache).poll_once()

    states = {job_id: (client.status(job_id)["state"], client.status(job_id)["message"]) for job_id in specs}
    assert {state for state, _ in states.values()} == {"succeeded"}, f"every shared job must succeed before the queries run: {states}"
    assert copy_parts(store, layout, "sal-docs", IN_PROGRESS) == 3, "the uncommitted job needs one part per table"
    return SimpleNamespace(client=client, store=store, layout=layout, specs=specs)


def expected(client: Client, job_ids: list[str], table: str) -> pd.DataFrame:
    """Return the rows of `job_ids` through the independent boto3 path, with sorted columns."""
    frame = client.tables(sorted(job_ids), table)
    return frame[sorted(frame.columns)]


def assert_same_rows(actual: pd.DataFrame, reference: pd.DataFrame, case: str) -> None:
    assert sorted(actual["job_id"].unique()) == sorted(reference["job_id"].unique()), f"{case}: the query returned other jobs than expected"
    assert len(actual) == len(reference), f"{case}: the query returned {len(actual)} rows, expected {len(reference)}"
    pd.testing.assert_frame_equal(actual[sorted(actual.columns)], reference, obj=case)


@pytest.mark.parametrize("table", TABLES)
def test_query_unfiltered_reads_committed_jobs(shared, table):
    frame = shared.client.query(table)

    assert IN_PROGRESS not in set(frame["job_id"]), "parts of a job without summary.json must not be read"
    assert_same_rows(frame, expected(shared.client, ALL_JOBS, table), f"all {table}")


def test_query_by_model(shared):
    bart = shared.specs["bart-docs"]["model"]
    gpt2 = shared.specs["sal-docs"]["model"]

    assert_same_rows(shared.client.query("attributions", models=bart), expected(shared.client, ["bart-docs"], "attributions"), "models=bart as a string")
    gpt2_jobs = ["20240101", "ixg-docs", "sal-bench", "sal-docs"]
    assert_same_rows(shared.client.query("sequences", models=[gpt2]), expected(shared.client, gpt2_jobs, "sequences"), "models=[gpt2]")


def test_query_by_method(shared):
    saliency_jobs = ["20240101", "bart-docs", "sal-bench", "sal-docs"]

    assert_same_rows(shared.client.query("attributions", methods="input_x_gradient"), expected(shared.client, ["ixg-docs"], "attributions"), "methods=input_x_gradient")
    assert_same_rows(shared.client.query("attributions", methods=["saliency"]), expected(shared.client, saliency_jobs, "attributions"), "methods=[saliency]")
    assert_same_rows(shared.client.query("sequences", methods=["saliency", "input_x_gradient"]), expected(shared.client, ALL_JOBS, "sequences"), "both methods")


def test_query_by_labels(shared):
    docs = shared.client.query("attributions", labels={"run": "docs"})
    assert "sal-bench" not in set(docs["job_id"]), "a label value equal to the filter's value under another key must not match"
    assert_same_rows(docs, expected(shared.client, ["bart-docs", "ixg-docs", "sal-docs"], "attributions"), "labels run=docs")

    team = shared.client.query("step_scores", labels={"run": "docs", "team": "a"})
    assert_same_rows(team, expected(shared.client, ["sal-docs"], "step_scores"), "labels run=docs and team=a")

    everything = shared.client.query("sequences", labels={})
    assert_same_rows(everything, expected(shared.client, ALL_JOBS, "sequences"), "empty labels filter")


def test_query_by_job_ids(shared):
    frame = shared.client.query("attributions", job_ids=["20240101", "sal-bench"])

    assert_same_rows(frame, expected(shared.client, ["20240101", "sal-bench"], "attributions"), "job_ids")
    digits_only = shared.client.query("sequences", job_ids="20240101")
    assert digits_only["job_id"].tolist() == ["20240101", "20240101"], "an all-digit job id must stay a string"
    assert_same_rows(shared.client.query("sequences", job_ids="ixg-docs"), expected(shared.client, ["ixg-docs"], "sequences"), "job_ids as a string")


def test_query_combined_filters(shared):
    gpt2 = shared.specs["sal-docs"]["model"]

    combined = shared.client.query("attributions", models=gpt2, methods="saliency", labels={"run": "docs"})
    assert_same_rows(combined, expected(shared.client, ["sal-docs"], "attributions"), "model, method and labels")

    ids_and_labels = shared.client.query("sequences", job_ids=["sal-docs", "sal-bench", "bart-docs"], labels={"run": "docs"})
    assert_same_rows(ids_and_labels, expected(shared.client, ["bart-docs", "sal-docs"], "sequences"), "job_ids and labels")


def test_query_step_scores_union_columns(shared):
    frame = shared.client.query("step_scores")

    assert {"probability", "entropy"} <= set(frame.columns), f"step score columns of all jobs must be present, got {list(frame.columns)}"
    bench = frame[frame["job_id"] == "sal-bench"]
    assert len(bench) > 0, "sal-bench has step_scores rows even without step scores"
    assert bench["probability"].isna().all(), "a job without a step score gets nulls in its column"
    assert frame[frame["job_id"] == "ixg-docs"]["entropy"].notna().all(), "ixg-docs asked for entropy"


def test_query_selects_columns(shared):
    columns = ["target_token", "score", "job_id"]
    frame = shared.client.query("attributions", columns=columns, job_ids=["sal-docs"])

    assert list(frame.columns) == columns, "the query must return the requested columns in the requested order"
    reference = shared.client.tables(["sal-docs"], "attributions")
    assert frame["score"].tolist() == reference["score"].tolist(), "scores differ from the rows read through boto3"
    assert frame["target_token"].tolist() == reference["target_token"].tolist(), "tokens differ from the rows read through boto3"


def test_query_matching_nothing_is_empty(shared):
    cases = {
        "unknown model": dict(models=["no-such-model"]),
        "unmatched labels": dict(labels={"run": "nowhere"}),
        "unknown job id": dict(job_ids=["no-such-job"]),
        "uncommitted job id": dict(job_ids=[IN_PROGRESS]),
        "no job satisfies both": dict(methods="input_x_gradient", labels={"team": "b"}),
    }
    for case, filters in cases.items():
        frame = shared.client.query("attributions", **filters)
        assert frame.empty, f"{case}: expected no rows, got {len(frame)}"
        assert "score" in frame.columns, f"{case}: an empty result keeps the table's columns, got {list(frame.columns)}"

    picked = shared.client.query("step_scores", job_ids=["no-such-job"], columns=["job_id", "probability"])
    assert list(picked.columns) == ["job_id", "probability"], "an empty result keeps the requested columns"


def test_dataset_lists_committed_parts_only(shared):
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = shared.client.dataset("step_scores")

    assert dataset.schema.field("job_id").type == pa.string(), "job_id must be a string partition column"
    assert dataset.schema.names[0] == "job_id"
    assert {"probability", "entropy"} <= set(dataset.schema.names), "the schema must unite every part's columns"
    assert not [path for path in dataset.files if f"job_id={IN_PROGRESS}/" in path], "the uncommitted job's parts must be left out"
    assert len(dataset.files) == 6, f"five jobs, one with two chunks, give six parts, got {dataset.files}"

    rows = dataset.to_table(filter=ds.field("job_id") == "20240101").to_pandas()
    assert len(rows) == len(shared.client.tables(["20240101"], "step_scores")), "filtering the dataset on job_id must keep that job's rows"


def test_read_parquet_with_client_filesystem(shared):
    client = shared.client
    path = client.table_path("sequences")
    assert path == f"{client.bucket}/{PREFIX}/tables/sequences/"

    frame = pd.read_parquet(path, filesystem=client.filesystem())
    counts = frame.groupby("job_id", observed=True).size().to_dict()
    reference = client.tables(ALL_JOBS + [IN_PROGRESS], "sequences").groupby("job_id").size().to_dict()
    assert {str(job_id): count for job_id, count in counts.items()} == reference, "pd.read_parquet reads every part, committed or not"

    filtered = pd.read_parquet(client.table_path("attributions"), filesystem=client.filesystem(), filters=[("job_id", "==", "sal-docs")])
    assert len(filtered) == len(client.tables(["sal-docs"], "attributions")), "a job_id filter must keep exactly that job's rows"


def test_read_parquet_digit_job_id(shared):
    import pyarrow as pa
    import pyarrow.dataset as ds

    # A folder whose only job id is all digits, under a prefix the other tests do not read.
    digits = BucketLayout("digits-only")
    for info in shared.store.list(shared.layout.table_partition_prefix("sequences", "20240101")):
        shared.store.copy(info.key, info.key.replace(shared.layout.prefix, digits.prefix, 1))
    client = Client(shared.client.bucket, prefix=digits.prefix, endpoint_url=shared.client.endpoint_url)

    inferred = pd.read_parquet(client.table_path("sequences"), filesystem=client.filesystem())
    assert str(inferred["job_id"].cat.categories.dtype) == "int32", "without an explicit partitioning, all-digit ids are read as integers"

    partitioning = ds.partitioning(pa.schema([("job_id", pa.string())]), flavor="hive")
    frame = pd.read_parquet(client.table_path("sequences"), filesystem=client.filesystem(), partitioning=partitioning)
    assert frame["job_id"].tolist() == ["20240101", "20240101"], "the documented partitioning keeps job ids as strings"


def test_unknown_table_is_one_line_error(shared):
    for call in (lambda: shared.client.query("attribution"), lambda: shared.client.dataset("scores"), lambda: shared.client.table_path("")):
        with pytest.raises(ConfigError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith("Unknown table"), message
        assert "attributions, step_scores, sequences" in message, f"the message must list the tables: {message}"
        assert "\n" not in message


def test_invalid_filters_are_rejected(shared):
    cases = {
        "labels as a string": (dict(labels="run=docs"), "Invalid labels filter"),
        "numeric label value": (dict(labels={"run": 1}), "Invalid labels filter entry 'run': 1"),
        "unknown column": (dict(columns=["job_id", "scores"]), "Unknown column 'scores'"),
        "model name that is not a string": (dict(models=[None]), "Invalid models value None"),
    }
    for case, (arguments, start) in cases.items():
        with pytest.raises(ConfigError) as raised:
            shared.client.query("attributions", **arguments)
        assert str(raised.value).startswith(start), f"{case}: {raised.value}"
        assert "\n" not in str(raised.value), case


def test_missing_bucket_is_one_line_error(moto_server):
    client = Client("no-such-bucket-here", endpoint_url=moto_server.endpoint_url)

    with pytest.raises(BucketNotFoundError) as raised:
        client.query("attributions")
    assert "'no-such-bucket-here' does not exist" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_query_counts_job_after_commit(client, store, layout, make_worker, causal_model_dir):
    job_id = client.submit(input_text="A cat sat on", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})
    make_worker().poll_once()
    copy_parts(store, layout, job_id, IN_PROGRESS)

    before = client.query("sequences")
    assert list(before["job_id"]) == [job_id], "the job without summary.json must not be read"

    store.copy(layout.summary_key(job_id), layout.summary_key(IN_PROGRESS))
    after = client.query("sequences")
    assert sorted(after["job_id"]) == sorted([job_id, IN_PROGRESS]), "a job counts as soon as its summary.json exists"


def test_query_uses_aws_endpoint_url(moto_server, bucket, make_worker, causal_model_dir, monkeypatch):
    # The client must hand the endpoint from AWS_ENDPOINT_URL to pyarrow's S3 client itself.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    client = Client(bucket)
    job_id = client.submit(input_text="A cat", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})
    make_worker().poll_once()

    assert list(client.query("sequences")["job_id"]) == [job_id]
