"""Profiles of a warm one-text job and of a many-job drain, written with pyinstrument.

Besides pyinstrument's own text and HTML reports, each profile is split into shares of
wall time. Every sample goes to the innermost tokviz function of `CATEGORIES` on its
call stack, so S3 calls inside the chunk writer count as S3 and not as writing. The
profiler samples the main thread only; the lease heartbeat thread is not included.
Job batching is off, as in the throughput part, so each job runs its own Inseq call.
"""

from collections import Counter
from pathlib import Path

from bench.harness import distinct_texts, job_spec, warm_pipeline

SAMPLE_SECONDS = 0.001
OTHER = "other tokviz code (intake, lifecycle, worker loop)"
CATEGORIES = {
    ("pipeline/runner.py", "attribute_inputs"): "Inseq attribution and aggregation",
    ("pipeline/tables.py", "build_chunk_tables"): "building Arrow tables",
    ("pipeline/tables.py", "to_parquet_bytes"): "Parquet encoding",
    ("pipeline/results.py", "_inseq_json_gz"): "Inseq JSON save (per chunk and final)",
    ("pipeline/results.py", "_read_inseq_chunk"): "Inseq JSON reload of chunks",
    ("pipeline/results.py", "write_final_outputs"): "merging chunk outputs (inseq.merge_attributions)",
    ("pipeline/results.py", "render_report"): "HTML report (Inseq show)",
    ("pipeline/store.py", "_call"): "S3 requests (boto3 to the local moto server)",
    ("pipeline/models.py", "get"): "model cache lookup",
    ("pipeline/client.py", "submit"): "client submit (spec validation)",
}


def profile(directory: Path, jobs: int, max_new_tokens: int) -> dict:
    """Profile one warm one-text job, then `jobs` jobs drained in one pass, and write the reports."""
    from pyinstrument import Profiler

    directory.mkdir(parents=True, exist_ok=True)
    results = {}
    with warm_pipeline(max_new_tokens, batching=False) as pipeline:
        for name, texts in (("one-job", distinct_texts(1)), (f"throughput-{jobs}", distinct_texts(jobs))):
            specs = [job_spec([text], max_new_tokens) for text in texts]
            profiler = Profiler(interval=SAMPLE_SECONDS)
            profiler.start()
            job_ids = pipeline.run_jobs(specs)
            session = profiler.stop()
            pipeline.check_succeeded(job_ids)

            (directory / f"{name}.txt").write_text(profiler.output_text(unicode=True, color=False))
            (directory / f"{name}.html").write_text(profiler.output_html())
            results[name] = {"seconds": session.duration, "shares": _shares(session.root_frame())}
    return {"directory": str(directory), "profiles": results}


def _shares(root) -> dict[str, float]:
    """Split the profile's time by the innermost matching category on each call stack."""
    seconds: Counter = Counter()
    pending = [(root, OTHER)]
    while pending:
        frame, category = pending.pop()
        category = CATEGORIES.get(_identity(frame), category)
        children_time = sum(child.time for child in frame.children)
        seconds[category] += max(frame.time - children_time, 0.0)
        pending.extend((child, category) for child in frame.children)

    total = sum(seconds.values())
    return {category: value / total for category, value in seconds.most_common()}


def _identity(frame) -> tuple[str, str] | None:
    path = (frame.file_path or "").replace("\\", "/")
    for suffix, function in CATEGORIES:
        if frame.function == function and path.endswith(suffix):
            return suffix, function
    return None


def describe(result: dict) -> list[str]:
    lines = [f"profiles (pyinstrument, text and HTML in {result['directory']}):"]
    for name, profile_result in result["profiles"].items():
        lines.append(f"  {name}: {profile_result['seconds']:.1f} s of wall time")
        for category, share in profile_result["shares"].items():
            lines.append(f"    {share * 100:5.1f} %  {category}")
    return lines
