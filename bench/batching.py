"""Throughput of many one-text jobs through a warm worker with batching on and off, against a bare Inseq loop.

Run with `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.batching`. Everything runs side
by side in one process, against a moto server on 127.0.0.1, and medians over repeats
are printed as ratios. The target is a batched pipeline at least 1.3x faster than the
bare loop of `model.attribute` calls.
"""

import argparse
import os
import signal
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"
METHOD = "input_x_gradient"
MAX_NEW_TOKENS = 6
# Each name is one token of the bundled model's tokenizer after a space, so every text
# below has the same token length. `batched_throughput` checks this before measuring.
COUNTRIES = (
    "France", "Italy", "Spain", "Germany", "Japan", "China", "India", "Brazil", "Canada", "Russia",
    "Egypt", "Mexico", "Greece", "Sweden", "Norway", "Poland", "Peru", "Chile", "Kenya", "Iran",
    "Iraq", "Cuba", "Turkey", "Ireland", "Portugal", "Austria", "Belgium", "Denmark", "Finland", "Israel",
    "Korea", "Vietnam", "Thailand", "Nigeria", "Morocco", "Argentina", "Australia", "Scotland", "England", "Ukraine",
)


def batched_throughput(jobs: int = 30, repeats: int = 3) -> dict:
    """Time `jobs` one-text jobs through a batching worker, a non-batching worker and a bare Inseq loop.

    Returns the median seconds of each over `repeats`, with the job count. Pipeline
    times include submitting the jobs and writing their results. Both workers first
    run one warm-up round, so the batching worker's one-time unbatched check of the
    batch key is not timed.
    """
    from pipeline.client import Client
    from pipeline.layout import BucketLayout
    from pipeline.local_s3 import LOCAL_CREDENTIALS, LocalS3
    from pipeline.models import ModelCache
    from pipeline.worker import Worker, WorkerConfig

    texts = job_texts(jobs)
    os.environ.update(LOCAL_CREDENTIALS)
    with LocalS3() as server:
        server.create_bucket("bench-batching")
        client = Client("bench-batching", endpoint_url=server.endpoint_url)
        models = ModelCache()
        loaded = models.get(MODEL, "cpu")
        check_same_length(loaded.attribution_model(METHOD), texts)

        batching = Worker(client.store, BucketLayout(), WorkerConfig(), models)
        alone = Worker(client.store, BucketLayout(), WorkerConfig(max_batch_jobs=1), models)
        for worker in (batching, alone):
            run_jobs(client, worker, texts[: worker.config.max_batch_jobs])

        times = {"bare_loop_s": [], "batched_pipeline_s": [], "unbatched_pipeline_s": []}
        for _ in range(repeats):
            times["bare_loop_s"].append(bare_loop(loaded, texts))
            times["batched_pipeline_s"].append(run_jobs(client, batching, texts))
            times["unbatched_pipeline_s"].append(run_jobs(client, alone, texts))
    return {"jobs": jobs, **{name: statistics.median(values) for name, values in times.items()}}


def job_texts(jobs: int) -> list[str]:
    """Return `jobs` prompts that differ only in a one-token country name."""
    from pipeline.errors import ConfigError

    if not 1 <= jobs <= len(COUNTRIES):
        raise ConfigError(f"Invalid job count {jobs}: use 1 to {len(COUNTRIES)}, one per country name in bench.batching.COUNTRIES")
    return [f"The capital of {country} is" for country in COUNTRIES[:jobs]]


def check_same_length(attribution_model, texts: list[str]) -> None:
    """Raise unless Inseq encodes every text to the same number of tokens."""
    from pipeline.errors import ConfigError

    lengths = {text: int(attribution_model.encode([text]).input_ids.shape[1]) for text in texts}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"The benchmark texts differ in token length ({lengths}); use country names that are one token each")


def job_spec(text: str) -> dict:
    return {"input_text": text, "model": MODEL, "method": METHOD, "device": "cpu", "generation_args": {"max_new_tokens": MAX_NEW_TOKENS}}


def run_jobs(client, worker, texts: list[str]) -> float:
    """Submit one job per text, run them all with `worker`, and return the seconds taken."""
    from pipeline.errors import JobFailedError

    started = time.perf_counter()
    job_ids = [client.submit(job_spec(text)) for text in texts]
    worker.poll_once()
    seconds = time.perf_counter() - started

    for job_id in job_ids:
        record = client.status(job_id)
        if record["state"] != "succeeded":
            raise JobFailedError(f"Benchmark job {job_id} ended {record['state']}: {record['message']}")
    return seconds


def bare_loop(loaded, texts: list[str]) -> float:
    """Time one `model.attribute` call per text, with the keyword arguments the worker passes."""
    from pipeline.runner import attribute_kwargs
    from pipeline.spec import parse_spec

    attribution_model = loaded.attribution_model(METHOD)
    specs = [parse_spec(_json(job_spec(text))) for text in texts]

    started = time.perf_counter()
    for text, spec in zip(texts, specs, strict=True):
        attribution_model.attribute(**attribute_kwargs(attribution_model, spec, [text], None))
    return time.perf_counter() - started


def _json(data: dict) -> bytes:
    import json

    return json.dumps(data).encode()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30, help="One-text jobs per measurement.")
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per measurement (median reported).")
    args = parser.parse_args()

    # SIGTERM (from `timeout` or `kill`) must also stop the moto server child process.
    signal.signal(signal.SIGTERM, _interrupt)
    result = batched_throughput(args.jobs, args.repeats)
    print(f"median of {args.repeats}:")
    for line in describe(result):
        print(line)


def describe(result: dict) -> list[str]:
    """Return report lines with the ratios against the bare loop."""
    bare, batched, unbatched = result["bare_loop_s"], result["batched_pipeline_s"], result["unbatched_pipeline_s"]
    return [
        f"batching, {result['jobs']} same-length one-text jobs, {MODEL}, {METHOD}, {MAX_NEW_TOKENS} new tokens:",
        f"  bare loop of model.attribute  {bare:.2f} s",
        f"  pipeline, batching on         {batched:.2f} s, bare loop / pipeline {bare / batched:.2f}x (target >= 1.3x)",
        f"  pipeline, batching off        {unbatched:.2f} s, bare loop / pipeline {bare / unbatched:.2f}x",
        f"  batching on against off       {unbatched / batched:.2f}x faster",
    ]

if __name__ == "__main__":
    main()
