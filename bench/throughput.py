"""Throughput: many one-text jobs through one warm worker, against two alternatives.

- pipeline: submit every job, then one worker pass drains the queue; timed from the
  first submit to the last commit. Job batching is off (`max_batch_jobs=1`), so each
  job makes its own Inseq call like the other two sides; `bench.batching` measures
  batched throughput.
- load per job: what a naive service does for each request in a warm process. It builds
  a fresh `ModelCache`, loads config, float32 weights and tokenizer from the
  converted-weights cache (no GGUF conversion, no imports), wraps them with
  `inseq.load_model`, then runs the same Inseq call and aggregation. It writes nothing,
  so it does less than the pipeline apart from the load.
- bare loop: the same Inseq call and aggregation for each text on the already loaded
  model, with nothing around it.
- pipeline, batching on: the same jobs through a worker with the default
  `max_batch_jobs`, which shares Inseq calls between jobs whose texts have one token length.
- GGUF load per job: what a service without tokviz's converted-weights cache does for
  each request with the bundled model: transformers reads and de-quantizes the GGUF
  file, then Inseq wraps the model and attributes the text. Each such job takes about
  half a minute, so this side runs on the first `gguf_jobs` texts only and is compared
  per job.

Each round runs the three sides one after another, and the order rotates between rounds
so load from other processes falls on every side alike.
"""

import gc
import time

from bench.harness import DEVICE, MODEL, bare_attribute, distinct_texts, job_spec, load_average, median, warm_pipeline

SIDES = ("pipeline", "load_per_job", "bare_loop", "pipeline_batched")


def throughput(jobs: int, rounds: int, max_new_tokens: int, gguf_jobs: int = 3) -> dict:
    """Run `rounds` rounds of `jobs` texts on each side; return median seconds per side."""
    texts = distinct_texts(jobs)
    times = {name: [] for name in SIDES}
    load_before = load_average()

    with warm_pipeline(max_new_tokens, batching=False) as pipeline:
        batching_worker = _batching_worker(pipeline)
        runners = {
            "pipeline": lambda: _run_pipeline(pipeline, texts, max_new_tokens),
            "load_per_job": lambda: _run_load_per_job(pipeline, texts, max_new_tokens),
            "bare_loop": lambda: _run_bare_loop(pipeline, texts, max_new_tokens),
            "pipeline_batched": lambda: _run_pipeline(pipeline, texts, max_new_tokens, batching_worker),
        }
        _run_pipeline(pipeline, texts[:8], max_new_tokens, batching_worker)  # the one-time batch check stays untimed
        for round_index in range(rounds):
            shift = round_index % len(SIDES)
            for name in SIDES[shift:] + SIDES[:shift]:
                times[name].append(runners[name]())
        gguf_seconds = _run_gguf_load_per_job(texts[:gguf_jobs], max_new_tokens) if gguf_jobs else None

    return {
        "jobs": jobs,
        "rounds": rounds,
        "times": times,
        "median_s": {name: median(values) for name, values in times.items()},
        "gguf_jobs": gguf_jobs,
        "gguf_per_job_s": gguf_seconds,
        "load": f"{load_before} -> {load_average()}",
    }


def _batching_worker(pipeline):
    from pipeline.layout import BucketLayout
    from pipeline.worker import Worker, WorkerConfig

    return Worker(pipeline.worker.store, BucketLayout(), WorkerConfig(), pipeline.models)


def _run_gguf_load_per_job(texts: list[str], max_new_tokens: int) -> float:
    """Return the median seconds of loading the bundled GGUF model afresh and attributing one text."""
    from pipeline.models import LoadedModel, _load_pretrained, bundled_gguf_path

    gguf = bundled_gguf_path()
    seconds = []
    for text in texts:
        started = time.perf_counter()
        model, tokenizer = _load_pretrained(str(gguf), {"path": str(gguf.parent), "gguf_file": gguf.name}, DEVICE)
        loaded = LoadedModel(MODEL, model, tokenizer, DEVICE, model.config.is_encoder_decoder, time.perf_counter() - started, False)
        bare_attribute(loaded, text, max_new_tokens)
        seconds.append(time.perf_counter() - started)
        del model, tokenizer, loaded
        gc.collect()
    return median(seconds)


def _run_pipeline(pipeline, texts: list[str], max_new_tokens: int, worker=None) -> float:
    specs = [job_spec([text], max_new_tokens) for text in texts]
    started = time.perf_counter()
    job_ids = pipeline.run_jobs(specs, worker)
    seconds = time.perf_counter() - started
    pipeline.check_succeeded(job_ids)
    return seconds


def _run_load_per_job(pipeline, texts: list[str], max_new_tokens: int) -> float:
    from pipeline.models import ModelCache

    started = time.perf_counter()
    for text in texts:
        loaded = ModelCache(cache_dir=pipeline.models.cache_dir).get(MODEL, DEVICE)
        bare_attribute(loaded, text, max_new_tokens)
        del loaded
    seconds = time.perf_counter() - started

    # Free the last copy now, so its memory is not reclaimed inside another side's timing.
    gc.collect()
    return seconds


def _run_bare_loop(pipeline, texts: list[str], max_new_tokens: int) -> float:
    started = time.perf_counter()
    for text in texts:
        bare_attribute(pipeline.loaded, text, max_new_tokens)
    return time.perf_counter() - started


def describe(result: dict) -> list[str]:
    medians = result["median_s"]
    naive_ratio = medians["load_per_job"] / medians["pipeline"]
    bare_ratio = medians["bare_loop"] / medians["pipeline"]
    batched_ratio = medians["bare_loop"] / medians["pipeline_batched"]
    pipeline_per_job = medians["pipeline"] / result["jobs"]
    per_round = ", ".join(
        f"{load:.1f}/{pipe:.1f}/{bare:.1f}"
        for pipe, load, bare in zip(result["times"]["pipeline"], result["times"]["load_per_job"], result["times"]["bare_loop"], strict=True)
    )
    return [
        f"throughput, {result['jobs']} one-text jobs ({result['rounds']} rounds, load {result['load']}): "
        f"pipeline {medians['pipeline']:.1f} s, load per job {medians['load_per_job']:.1f} s, bare loop {medians['bare_loop']:.1f} s",
        f"  load per job / pipeline: {naive_ratio:.2f}x (target >= 5x)",
        f"  bare loop / pipeline: {bare_ratio:.2f} (target >= 0.95; below 1 means the pipeline is slower)",
        f"  bare loop / pipeline with batching on: {medians['bare_loop']:.1f} s / {medians['pipeline_batched']:.1f} s = {batched_ratio:.2f}",
        f"  per round, load per job / pipeline / bare loop in s: {per_round}",
        *_gguf_lines(result, pipeline_per_job),
    ]


def _gguf_lines(result: dict, pipeline_per_job: float) -> list[str]:
    if result["gguf_per_job_s"] is None:
        return []
    ratio = result["gguf_per_job_s"] / pipeline_per_job
    return [
        f"  GGUF load per job (median of {result['gguf_jobs']} jobs): {result['gguf_per_job_s']:.1f} s per job, "
        f"pipeline {pipeline_per_job:.2f} s per job: {ratio:.1f}x (target >= 5x)",
    ]
