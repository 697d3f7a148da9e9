"""`tokviz demo`: the whole pipeline on this machine, end to end.

It starts a moto S3 server on 127.0.0.1, creates a bucket, starts `tokviz worker` as a
child process, submits a job through the same client a user calls, waits with a
progress bar, downloads the results and prints the most important input tokens.
"""

import os
import subprocess
import sys
from pathlib import Path

from pipeline.local_s3 import LOCAL_CREDENTIALS, LocalS3

DEMO_BUCKET = "tokviz-demo"


def run_demo(text: str, method: str, max_new_tokens: int, target: str) -> None:
    from rich.console import Console

    console = Console()
    for name, value in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(name, value)

    with LocalS3() as server:
        server.create_bucket(DEMO_BUCKET)
        console.print(f"S3 server (moto) on {server.endpoint_url}, bucket [bold]{DEMO_BUCKET}[/]")
        worker = _start_worker(server.endpoint_url)
        try:
            _run_job(console, server.endpoint_url, text, method, max_new_tokens, target)
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def _start_worker(endpoint_url: str) -> subprocess.Popen:
    env = {**os.environ, "TOKVIZ_ENDPOINT_URL": endpoint_url, "TOKVIZ_BUCKET": DEMO_BUCKET, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cli.main", "worker", "--poll-interval", "0.2", "--lease-seconds", "30"]
    return subprocess.Popen(command, env=env)


def _run_job(console, endpoint_url: str, text: str, method: str, max_new_tokens: int, target: str) -> None:
    from cli.job_commands import _wait_with_progress
    from pipeline.client import Client
    from pipeline.errors import JobFailedError

    client = Client(DEMO_BUCKET, endpoint_url=endpoint_url)
    spec = {"input_text": text, "method": method, "step_scores": ["probability"], "generation_args": {"max_new_tokens": max_new_tokens}}
    job_id = client.submit(spec)
    console.print(f"Submitted job [bold]{job_id}[/]: {method} on {text!r} with the bundled SmolLM2-135M-Instruct")

    record = _wait_with_progress(client, job_id, timeout=900, show=True)
    if record["state"] != "succeeded":
        raise JobFailedError(f"Demo job ended {record['state']}: {record.get('message')}")

    paths = client.download(job_id, target)
    _print_top_tokens(console, client.table(job_id, "attributions"), client.table(job_id, "sequences"))
    report = next(path for path in paths if path.name == "report.html")
    console.print(f"\nDownloaded {len(paths)} files to {Path(target).resolve()}")
    console.print(f"HTML report: {report}")


def _print_top_tokens(console, attributions, sequences) -> None:
    from rich.table import Table

    from pipeline.analysis import top_tokens
    from pipeline.plots import format_token

    console.print(f"\nGenerated: {sequences.loc[0, 'generated_text']!r}")
    top = top_tokens(attributions, k=3)
    table = Table(title="Most important input tokens per generated token", header_style="bold")
    table.add_column("step")
    table.add_column("generated")
    for rank in (1, 2, 3):
        table.add_column(f"#{rank} input (score)")
    for (target_idx, target_token), rows in top.groupby(["target_idx", "target_token"], sort=True):
        cells = [f"{format_token(row.input_token)} ({row.score:.3f})" for row in rows.sort_values("rank").itertuples()]
        table.add_row(str(target_idx), format_token(target_token), *cells)
    console.print(table)
