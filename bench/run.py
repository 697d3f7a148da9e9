"""Benchmarks measured side by side in one run; prints ratios with medians over repeats.

Run with `make bench` (or `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.run`). Results and
the command go in docs/benchmarks.md. Speed targets live here, never in the tests.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "The capital of France is"
MAX_NEW_TOKENS = 6

COLD_START_CODE = """
import time, sys
started = time.perf_counter()
from pipeline.models import ModelCache
from pathlib import Path
ModelCache(cache_dir=Path(sys.argv[1])).get("smollm2-135m-instruct", "cpu").attribution_model("input_x_gradient")
print(time.perf_counter() - started)
"""


def cold_start(repeats: int) -> dict:
    """Time a fresh process loading the bundled model without and with the converted cache."""
    without, with_cache = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            without.append(_timed_load(cache))
            with_cache.append(_timed_load(cache))
    return {"without_cache_s": statistics.median(without), "with_cache_s": statistics.median(with_cache)}


def _timed_load(cache: str) -> float:
    output = subprocess.run([sys.executable, "-c", COLD_START_CODE, cache], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def overhead(repeats: int) -> dict:
    """Time a one-text job through a warm worker against a bare `model.attribute` call."""
    from pipeline.client import Client
    from pipeline.layout import BucketLayout
    from pipeline.local_s3 import LOCAL_CREDENTIALS, LocalS3
    from pipeline.models import ModelCache
    from pipeline.worker import Worker, WorkerConfig

    os.environ.update(LOCAL_CREDENTIALS)
    spec = {"input_text": TEXT, "method": "input_x_gradient", "generation_args": {"max_new_tokens": MAX_NEW_TOKENS}}
    with LocalS3() as server, tempfile.TemporaryDirectory() as cache:
        server.create_bucket("bench")
        client = Client("bench", endpoint_url=server.endpoint_url)
        models = ModelCache(cache_dir=cache)
        worker = Worker(client.store, BucketLayout(), WorkerConfig(), models)
        attribution_model = models.get("smollm2-135m-instruct", "cpu").attribution_model("input_x_gradient")

        client.submit(spec)
        worker.poll_once()  # warm-up: first Inseq call and first S3 requests

        pipeline_times, bare_times = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            job_id = client.submit(spec)
            worker.poll_once()
            assert client.status(job_id)["state"] == "succeeded"
            pipeline_times.append(time.perf_counter() - started)

            started = time.perf_counter()
            attribution_model.attribute([TEXT], generation_args={"max_new_tokens": MAX_NEW_TOKENS}, show_progress=False)
            bare_times.append(time.perf_counter() - started)
    return {"pipeline_s": statistics.median(pipeline_times), "bare_inseq_s": statistics.median(bare_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Repeats per measurement (median reported).")
    parser.add_argument("--cold-repeats", type=int, default=2, help="Repeats of the cold-start pair.")
    args = parser.parse_args()

    cold = cold_start(args.cold_repeats)
    print(f"cold start, bundled model: without cache {cold['without_cache_s']:.2f} s, with cache {cold['with_cache_s']:.2f} s, "
          f"speed-up {cold['without_cache_s'] / cold['with_cache_s']:.1f}x (target >= 4x)")

    warm = overhead(args.repeats)
    print(f"one-text job, warm worker: pipeline {warm['pipeline_s']:.3f} s, bare Inseq {warm['bare_inseq_s']:.3f} s, "
          f"ratio {warm['pipeline_s'] / warm['bare_inseq_s']:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
