"""Overhead: a one-text job through a warm worker against the same Inseq work called bare.

Three measurements alternate in each repeat, with the order rotated so a burst of load
from other processes does not always land on the same side:

- the pipeline: submit, then one worker pass that accepts, claims, attributes, writes
  tables, Inseq JSON and HTML, and commits;
- the bare call with the worker's own arguments and aggregation (the fair comparison);
- the bare call with Inseq's defaults, as the earlier version of this benchmark made it.
"""

import time

from bench.harness import bare_attribute, distinct_texts, job_spec, load_average, median, warm_pipeline

TEXT = distinct_texts(1)[0]


def overhead(repeats: int, max_new_tokens: int) -> dict:
    """Time the three sides `repeats` times each, and return medians and per-repeat ratios."""
    times = {"pipeline": [], "bare": [], "bare_defaults": []}
    cpu = {"pipeline": [], "bare": []}
    load_before = load_average()

    with warm_pipeline(max_new_tokens) as pipeline:
        sides = {
            "pipeline": lambda: pipeline.check_succeeded(pipeline.run_jobs([job_spec([TEXT], max_new_tokens)])),
            "bare": lambda: _bare(pipeline, max_new_tokens),
            "bare_defaults": lambda: _bare_with_inseq_defaults(pipeline, max_new_tokens),
        }
        order = list(sides)
        for repeat in range(repeats):
            rotated = order[repeat % len(order) :] + order[: repeat % len(order)]
            for name in rotated:
                wall, cpu_seconds = _timed(pipeline, sides[name])
                times[name].append(wall)
                if name in cpu:
                    cpu[name].append(cpu_seconds)

    return {
        "repeats": repeats,
        "pipeline_s": median(times["pipeline"]),
        "bare_s": median(times["bare"]),
        "bare_defaults_s": median(times["bare_defaults"]),
        "pipeline_cpu_s": median(cpu["pipeline"]),
        "bare_cpu_s": median(cpu["bare"]),
        "ratios": [p / b for p, b in zip(times["pipeline"], times["bare"], strict=True)],
        "load": f"{load_before} -> {load_average()}",
    }


def _timed(pipeline, action) -> tuple[float, float]:
    cpu_started = pipeline.cpu_seconds()
    started = time.perf_counter()
    action()
    wall = time.perf_counter() - started
    return wall, pipeline.cpu_seconds() - cpu_started


def _bare(pipeline, max_new_tokens: int) -> None:
    bare_attribute(pipeline.loaded, TEXT, max_new_tokens)


def _bare_with_inseq_defaults(pipeline, max_new_tokens: int) -> None:
    # Inseq's defaults here: batch_size None, step_scores [], device None, no aggregation.
    pipeline.attribution_model.attribute([TEXT], generation_args={"max_new_tokens": max_new_tokens}, show_progress=False)


def describe(result: dict) -> list[str]:
    ratio = result["pipeline_s"] / result["bare_s"]
    cpu_ratio = result["pipeline_cpu_s"] / result["bare_cpu_s"]
    per_repeat = ", ".join(f"{value:.2f}" for value in result["ratios"])
    return [
        f"one-text job, warm worker ({result['repeats']} repeats, load {result['load']}): pipeline {result['pipeline_s']:.3f} s, "
        f"bare Inseq with the worker's arguments {result['bare_s']:.3f} s, ratio {ratio:.2f} (target <= 1.10); "
        f"per repeat [{per_repeat}]",
        f"  CPU time, this process plus the S3 server: pipeline {result['pipeline_cpu_s']:.3f} s, bare {result['bare_cpu_s']:.3f} s, ratio {cpu_ratio:.2f}",
        f"  bare Inseq with Inseq's defaults (the earlier benchmark's call): {result['bare_defaults_s']:.3f} s",
    ]
