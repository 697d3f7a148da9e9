"""Worker logs carry ids, states and keys, never job payloads or credentials."""

import json
import logging

import pytest

from pipeline.client import Client
from pipeline.logs import configure_logging
from pipeline.store import make_client

SECRET_KEY = "sEcReT-4f1c9b2e-never-log-me"
PAYLOAD = "Confidential patient note 7d3e"


@pytest.fixture
def restore_logging():
    """configure_logging changes the root logger; give the next tests theirs back."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {name: logging.getLogger(name).level for name in ("pipeline", "handlers", "cli")})
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_logs_hold_no_payloads(moto_server, bucket, causal_model_dir, make_worker, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOGCHECK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    configure_logging("DEBUG", json_lines=True)
    client = Client(bucket, endpoint_url=moto_server.endpoint_url)
    worker = make_worker()
    worker.store.client = make_client(moto_server.endpoint_url)

    good = client.submit(input_texts=[PAYLOAD], model=str(causal_model_dir), method="saliency", generation_args={"max_new_tokens": 2})
    forced = client.submit(input_texts=[PAYLOAD], generated_texts=["Not the input " + PAYLOAD], model=str(causal_model_dir), method="saliency")
    client.store.put(client.layout.inbox_key("raw-drop"), json.dumps({"input_text": PAYLOAD, "method": PAYLOAD}).encode())
    worker.poll_once()

    states = {job_id: client.status(job_id)["state"] for job_id in (good, forced, "raw-drop")}
    assert states == {good: "succeeded", forced: "rejected", "raw-drop": "rejected"}, states
    logged = capsys.readouterr().err
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert any(line.get("job_id") == good for line in lines), f"the logs should name the jobs they concern:\n{logged[:2000]}"
    assert PAYLOAD not in logged, "a job's input text reached the logs"
    assert SECRET_KEY not in logged, "the secret access key reached the logs"
