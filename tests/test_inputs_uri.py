"""Jobs whose inputs live in a JSONL, CSV or Parquet object in the bucket, run in chunks and resumed."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results import ResultWriter

TEXTS = [
    "The capital of France is",
    "A cat sat on the mat",
    "Hello world, this is",
    "The capital of Italy is",
    "Café naïve, 東京 and",
]
CHUNK_SIZE = 2
CHUNKS = 3


def inputs_body(kind: str) -> bytes:
    if kind == "jsonl":
        return "\n".join(json.dumps({"text": text}, ensure_ascii=False) for text in TEXTS).encode()
    if kind == "csv":
        return ("input_text\n" + "\n".join(f'"{text}"' for text in TEXTS) + "\n").encode()
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": TEXTS}), sink)
    return sink.getvalue()


def uri_spec(bucket: str, key: str, model_dir) -> dict:
    return {
        "model": str(model_dir),
        "method": "saliency",
        "inputs_uri": f"s3://{bucket}/{key}",
        "chunk_size": CHUNK_SIZE,
        "generation_args": {"max_new_tokens": 2},
    }


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_inputs_object_order_kept(client, store, make_worker, causal_model_dir, bucket, kind):
    key = f"inputs/rows.{kind}"
    store.put(key, inputs_body(kind))
    job_id = client.submit(uri_spec(bucket, key, causal_model_dir))

    make_worker().poll_once()

    record = client.status(job_id)
    assert record["state"] == "succeeded", record["message"]
    assert record["progress"]["chunks_total"] == CHUNKS, record["progress"]
    assert record["progress"]["done"] == len(TEXTS), record["progress"]
    sequences = client.table(job_id, "sequences")
    assert sequences["input_text"].tolist() == TEXTS, f"{kind}: inputs came back in another order or form"
    assert sequences["chunk"].tolist() == [0, 0, 1, 1, 2], sequences["chunk"].tolist()


def test_resume_skips_finished_chunks(client, store, make_worker, causal_model_dir, bucket, monkeypatch):
    key = "inputs/resume.jsonl"
    store.put(key, inputs_body("jsonl"))
    job_id = client.submit(uri_spec(bucket, key, causal_model_dir), job_id="resume-me")
    first = make_worker()
    original_write_chunk = ResultWriter.write_chunk

    def write_then_run_out_of_time(self, *args, **kwargs):
        written = original_write_chunk(self, *args, **kwargs)
        first.config.deadline = 0.0  # the next chunk boundary finds the time budget used up
        return written

    monkeypatch.setattr(ResultWriter, "write_chunk", write_then_run_out_of_time)
    [stopped] = first.poll_once()
    monkeypatch.setattr(ResultWriter, "write_chunk", original_write_chunk)

    assert stopped.state == "queued", f"the first worker should stop after one chunk: {stopped}"
    assert stopped.chunks_computed == 1, f"the first worker should stop after one chunk: {stopped}"
    assert client.status(job_id)["progress"]["chunks_done"] == 1

    [resumed] = make_worker().poll_once()

    assert resumed.state == "succeeded", client.status(job_id)["message"]
    assert resumed.chunks_computed == CHUNKS - 1, f"the second worker computed {resumed.chunks_computed} chunks; the finished one must be skipped"
    sequences = client.table(job_id, "sequences")
    assert sequences["input_text"].tolist() == TEXTS, sequences[["sequence_idx", "input_text"]]
    assert not sequences.duplicated("sequence_idx").any(), sequences[["sequence_idx", "input_text"]]

    client.submit(uri_spec(bucket, key, causal_model_dir), job_id="straight-through")
    make_worker().poll_once()
    for table in ("attributions", "sequences"):
        got = client.table("resume-me", table).drop(columns=["job_id", "attribution_seconds"], errors="ignore")
        expected = client.table("straight-through", table).drop(columns=["job_id", "attribution_seconds"], errors="ignore")
        assert got.equals(expected), f"the resumed job's {table} differ from an uninterrupted run"


def test_replaced_inputs_fail_resume(client, store, make_worker, causal_model_dir, bucket, monkeypatch):
    key = "inputs/changing.jsonl"
    store.put(key, inputs_body("jsonl"))
    job_id = client.submit(uri_spec(bucket, key, causal_model_dir))
    first = make_worker()
    original_write_chunk = ResultWriter.write_chunk

    def write_then_run_out_of_time(self, *args, **kwargs):
        written = original_write_chunk(self, *args, **kwargs)
        first.config.deadline = 0.0
        return written

    monkeypatch.setattr(ResultWriter, "write_chunk", write_then_run_out_of_time)
    first.poll_once()
    monkeypatch.setattr(ResultWriter, "write_chunk", original_write_chunk)
    store.put(key, "\n".join(json.dumps({"text": text.upper()}) for text in TEXTS).encode())

    make_worker().poll_once()

    record = client.status(job_id)
    assert record["state"] == "failed", f"mixing chunks of two different inputs objects must not succeed: {record['state']}"
    assert "changed" in record["message"], record["message"]
    assert key in record["message"], record["message"]
