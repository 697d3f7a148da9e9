"""The whole path over HTTP against a moto server process: submit, worker, tables, download."""

import gzip
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from pipeline.tables import METADATA_VERSION_KEY, SCHEMA_VERSION

ATTRIBUTION_COLUMNS = [
    "job_id", "sequence_idx", "target_idx", "target_token", "target_token_id", "side", "input_idx",
    "input_token", "input_token_id", "score", "model", "method", "labels",
]


def run_cli(moto_server, bucket, *args):
    result = CliRunner().invoke(main, ["--bucket", bucket, "--endpoint-url", moto_server.endpoint_url, *args], catch_exceptions=False)
    return result


def test_cli_submit_worker_download(moto_server, bucket, causal_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKVIZ_CACHE_DIR", str(tmp_path / "cache"))
    submitted = run_cli(
        moto_server, bucket, "submit", "The capital of France is", "A cat sat on",
        "--model", str(causal_model_dir), "--method", "saliency", "--step-score", "probability",
        "--max-new-tokens", "3", "--label", "experiment=smoke", "--job-id", "cli-job",
    )
    assert submitted.exit_code == 0, submitted.output
    assert submitted.output.strip() == "cli-job"

    worked = run_cli(moto_server, bucket, "worker", "--once", "--allow-local-models", "--poll-interval", "0.1")
    assert worked.exit_code == 0, worked.output

    status = run_cli(moto_server, bucket, "status", "cli-job", "--json")
    record = json.loads(status.output)
    assert record["state"] == "succeeded", record
    assert record["progress"]["done"] == 2

    downloaded = run_cli(moto_server, bucket, "download", "cli-job", "-o", str(tmp_path / "out"), "--json")
    paths = json.loads(downloaded.output)
    names = sorted(path.rsplit("/", 1)[-1] for path in paths)
    assert names == ["attributions.json.gz", "part-00000.parquet", "part-00000.parquet", "part-00000.parquet", "report.html", "summary.json"]
    assert (tmp_path / "out" / "tables" / "attributions" / "job_id=cli-job" / "part-00000.parquet").is_file()
    for path in paths:
        assert path.startswith(str(tmp_path / "out")), f"download wrote outside its folder: {path}"

    part = pq.read_table(tmp_path / "out" / "tables" / "attributions" / "job_id=cli-job" / "part-00000.parquet")
    assert part.schema.metadata[METADATA_VERSION_KEY] == SCHEMA_VERSION.encode()


def test_tables_have_design_columns(client, make_worker, causal_model_dir):
    job_id = client.submit(input_texts=["The capital of France is"], model=str(causal_model_dir), method="saliency", step_scores=["probability", "entropy"], generation_args={"max_new_tokens": 3}, labels={"run": "a"})
    make_worker().poll_once()

    attributions = client.table(job_id, "attributions")
    step_scores = client.table(job_id, "step_scores")
    sequences = client.table(job_id, "sequences")

    assert list(attributions.columns) == ATTRIBUTION_COLUMNS
    assert str(attributions["score"].dtype) == "float32"
    assert set(attributions["side"]) == {"target"}
    assert json.loads(attributions["labels"].iloc[0]) == {"run": "a"}
    assert len(step_scores) == 3, "one step_scores row per generated token"
    assert {"probability", "entropy"} <= set(step_scores.columns)
    assert sequences.loc[0, "generated_token_count"] == 3
    assert sequences.loc[0, "input_text"] == "The capital of France is"


def test_future_positions_not_stored(client, make_worker, causal_model_dir):
    job_id = client.submit(input_text="A cat sat", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 3})
    make_worker().poll_once()

    attributions = client.table(job_id)
    assert attributions["score"].notna().all()
    assert (attributions["input_idx"] < attributions["target_idx"]).all(), "a generated token is attributed only to earlier tokens"


def test_legacy_body_dropped_with_put_object(store, client, make_worker, causal_model_dir):
    body = {"model": str(causal_model_dir), "method": "saliency", "input_text": "Hello world", "step_scores": ["probability"], "force_cpu": True, "n_steps": 10}
    store.client.put_object(Bucket=store.bucket, Key="inbox/legacy.json", Body=json.dumps(body).encode())

    make_worker().poll_once()

    record = client.status("legacy")
    assert record["state"] == "succeeded", record.get("message")
    spec = json.loads(store.get("jobs/legacy/spec.json").body)
    assert spec["device"] == "cpu"
    assert spec["input_texts"] == ["Hello world"]
    assert not list(store.list("inbox/")), "the accepted drop must leave the inbox"


def test_inseq_json_round_trip(client, make_worker, causal_model_dir, tmp_path):
    import inseq

    job_id = client.submit(input_texts=["The capital of", "A cat"], model=str(causal_model_dir), method="input_x_gradient", generation_args={"max_new_tokens": 2})
    make_worker().poll_once()

    path = tmp_path / "attributions.json.gz"
    path.write_bytes(client.store.get(f"results/{job_id}/attributions.json.gz").body)
    loaded = inseq.FeatureAttributionOutput.load(str(path), decompress=True)

    assert len(loaded.sequence_attributions) == 2
    table = client.table(job_id)
    first = loaded.sequence_attributions[0]
    stored = table[(table["sequence_idx"] == 0) & (table["target_idx"] == first.attr_pos_start) & (table["input_idx"] == 0)]["score"].iloc[0]
    assert float(first.target_attributions[0, 0]) == pytest.approx(float(stored), abs=1e-6)


def test_summary_written_with_row_counts(client, make_worker, causal_model_dir):
    job_id = client.submit(input_texts=["One", "Two", "Three"], model=str(causal_model_dir), method="saliency", chunk_size=2, generation_args={"max_new_tokens": 2})
    make_worker().poll_once()

    summary = client.summary(job_id)
    assert summary["chunks"] == 2
    assert summary["sequences"] == 3
    assert summary["rows"]["attributions"] == len(client.table(job_id))
    assert summary["rows"]["sequences"] == 3


def test_inseq_error_fails_job_worker_continues(client, make_worker, causal_model_dir):
    broken = client.submit(input_text="The capital of", model=str(causal_model_dir), method="saliency", attr_pos_start=100, generation_args={"max_new_tokens": 2})
    fine = client.submit(input_text="The capital of", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})

    worker = make_worker()
    worker.poll_once()
    worker.poll_once()

    failed = client.status(broken)
    assert failed["state"] == "failed"
    assert failed["message"].startswith("Inseq failed running 'saliency'"), failed["message"]
    assert "\n" not in failed["message"]
    assert client.status(fine)["state"] == "succeeded"


def test_rejected_spec_keeps_raw_body(store, client, make_worker):
    raw = b'{"input_text": "Hi", "method": "no-such-method"}'
    store.client.put_object(Bucket=store.bucket, Key="inbox/bad.json", Body=raw)

    make_worker().poll_once()

    record = client.status("bad")
    assert record["state"] == "rejected"
    assert "'method'" in record["message"]
    assert store.get("jobs/bad/submitted.json").body == raw


def test_cli_errors_are_one_line(moto_server, bucket):
    result = CliRunner().invoke(main, ["--bucket", bucket, "--endpoint-url", moto_server.endpoint_url, "status", "missing-job"])
    assert result.exit_code == 3
    assert result.output.startswith("Error: Job 'missing-job' not found")
    assert result.output.count("\n") == 1


def test_cli_submit_rejects_bad_spec_locally(moto_server, bucket):
    result = CliRunner().invoke(main, ["--bucket", bucket, "--endpoint-url", moto_server.endpoint_url, "submit", "Hello", "--method", "bogus"])
    assert result.exit_code == 2
    assert "field 'method'" in result.output


def test_cli_help_imports_no_heavy_modules():
    import subprocess
    import sys

    code = "import sys, cli.main; heavy = [m for m in ('torch', 'transformers', 'inseq', 'pandas') if m in sys.modules]; print(heavy)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert output == "[]", f"cli.main imported {output} at startup"


def test_list_filters_by_state(client, make_worker, causal_model_dir, store):
    good = client.submit(input_text="Hi there", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 1})
    store.client.put_object(Bucket=store.bucket, Key="inbox/nope.json", Body=b"not json")
    make_worker().poll_once()

    assert [record["job_id"] for record in client.list(state="succeeded")] == [good]
    assert [record["job_id"] for record in client.list(state="rejected")] == ["nope"]


def test_report_html_written(client, make_worker, causal_model_dir):
    job_id = client.submit(input_text="The capital of", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})
    make_worker().poll_once()

    html = client.report_html(job_id)
    assert "<html" in html.lower() or "<div" in html.lower()


def test_gzip_json_is_inseq_format(client, make_worker, causal_model_dir):
    job_id = client.submit(input_text="The capital of", model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})
    make_worker().poll_once()

    data = json.loads(gzip.decompress(client.store.get(f"results/{job_id}/attributions.json.gz").body))
    assert "sequence_attributions" in json.dumps(data)[:20000]


def test_cli_show_and_compare(moto_server, bucket, client, make_worker, causal_model_dir, tmp_path):
    common = {"input_text": "The capital of France is", "generated_texts": ["The capital of France is is is"], "model": str(causal_model_dir)}
    saliency = client.submit(common, method="saliency")
    gradient = client.submit(common, method="input_x_gradient")
    make_worker().poll_once(max_jobs=2)

    shown = run_cli(moto_server, bucket, "show", saliency, "--png", str(tmp_path / "heat.png"), "--html", str(tmp_path / "report.html"))
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "heat.png").stat().st_size > 0
    assert (tmp_path / "report.html").stat().st_size > 0

    compared = run_cli(moto_server, bucket, "compare", saliency, gradient, "--json", "--png", str(tmp_path / "compare.png"))
    assert compared.exit_code == 0, compared.output
    pairs = json.loads(compared.output.split("\nWrote")[0])
    assert pairs[0]["tokens"] == 2, "two forced tokens were compared"
    assert -1.0 <= pairs[0]["pooled_spearman"] <= 1.0
