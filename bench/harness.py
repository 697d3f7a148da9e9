"""Shared set-up for the benchmarks: a local S3 server, a warm worker and the bare Inseq call.

Every part that needs a warm pipeline builds it here, so the worker, the client and the
bare `model.attribute` call are configured the same way in each measurement.
"""

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m-instruct"
METHOD = "input_x_gradient"
DEVICE = "cpu"
BUCKET = "bench"

SUBJECTS = (
    "France", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "Kenya", "Norway", "Chile",
    "Peru", "India", "China", "Greece", "Poland", "Mexico", "Sweden", "Turkey", "Ghana", "Cuba",
    "Nepal", "Iran", "Iraq", "Fiji", "Mali", "Laos", "Oman", "Chad", "Togo", "Malta",
)
TEMPLATES = (
    "The capital of {} is",
    "The language spoken in {} is",
    "The currency of {} is",
    "A famous dish from {} is",
    "The largest city in {} is",
)


def distinct_texts(count: int) -> list[str]:
    """Return `count` different short prompts, cycling templates before repeating subjects."""
    texts = []
    for index in range(count):
        subject = SUBJECTS[index % len(SUBJECTS)]
        template = TEMPLATES[(index // len(SUBJECTS)) % len(TEMPLATES)]
        round_number = index // (len(SUBJECTS) * len(TEMPLATES))
        text = template.format(subject)
        texts.append(text if round_number == 0 else f"Fact {round_number}: {text}")
    return texts


def job_spec(texts: list[str], max_new_tokens: int, **fields) -> dict:
    """Build a spec for the bundled model on the CPU. A single text goes in the legacy `input_text` field."""
    spec = {"model": MODEL, "method": METHOD, "device": DEVICE, "generation_args": {"max_new_tokens": max_new_tokens}}
    if len(texts) == 1:
        spec["input_text"] = texts[0]
    else:
        spec["input_texts"] = list(texts)
    spec.update(fields)
    return spec


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    """Return the 1-minute load average, to show how busy the shared machine was."""
    return f"{os.getloadavg()[0]:.2f}"


def process_cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of another process, read from /proc (Linux only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class WarmPipeline:
    """A local S3 server, a client and a worker with a loaded model, all in this process."""

    server: object
    client: object
    worker: object
    models: object
    loaded: object

    @property
    def attribution_model(self):
        return self.loaded.attribution_model(METHOD)

    def run_jobs(self, specs: list[dict], worker=None) -> list[str]:
        """Submit every spec, then let the worker (this pipeline's own by default) drain the queue in one pass."""
        job_ids = [self.client.submit(spec) for spec in specs]
        (worker or self.worker).poll_once()
        return job_ids

    def check_succeeded(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            record = self.client.status(job_id)
            if record["state"] != "succeeded":
                raise RuntimeError(f"Benchmark job {job_id} ended {record['state']}: {record.get('message')}")

    def cpu_seconds(self) -> float:
        """Return CPU seconds used so far by this process and the S3 server together."""
        return time.process_time() + process_cpu_seconds(self.server.process.pid)


@contextmanager
def warm_pipeline(max_new_tokens: int, batching: bool = True) -> Iterator[WarmPipeline]:
    """Start a local S3 server and a worker, and run one job so later timings are warm.

    The worker and the client get separate boto3 clients, so their requests can be
    counted apart. Models come from the default converted-weights cache, so only the
    first benchmark run on a machine pays the GGUF conversion. `batching=False` sets
    `max_batch_jobs=1`, so every job runs its own Inseq calls.
    """
    from pipeline.client import Client
    from pipeline.layout import BucketLayout
    from pipeline.local_s3 import LOCAL_CREDENTIALS, LocalS3
    from pipeline.models import ModelCache
    from pipeline.store import ObjectStore, make_client
    from pipeline.worker import Worker, WorkerConfig

    os.environ.update(LOCAL_CREDENTIALS)
    with LocalS3() as server:
        server.create_bucket(BUCKET)
        client = Client(BUCKET, endpoint_url=server.endpoint_url, s3_client=make_client(server.endpoint_url))
        models = ModelCache()
        config = WorkerConfig() if batching else WorkerConfig(max_batch_jobs=1)
        worker = Worker(ObjectStore(make_client(server.endpoint_url), BUCKET), BucketLayout(), config, models)
        pipeline = WarmPipeline(server, client, worker, models, models.get(MODEL, DEVICE))

        # Warm-up: the first Inseq call, the first requests and the first report pay one-off costs.
        warm_up_ids = pipeline.run_jobs([job_spec(["Warm-up text"], max_new_tokens)])
        pipeline.check_succeeded(warm_up_ids)
        bare_attribute(pipeline.loaded, "Warm-up text", max_new_tokens)
        yield pipeline


def bare_attribute(loaded, text: str, max_new_tokens: int):
    """Run the Inseq work the worker runs for a one-text job, with nothing around it.

    The keyword arguments come from the worker's own `attribute_kwargs`, so batch size,
    step scores, device and `attribute_target` match what the worker passes, and the
    worker's own `aggregate` reduces the scores as it does before building tables.
    """
    from pipeline.runner import aggregate, attribute_kwargs
    from pipeline.spec import JobSpec

    spec = JobSpec.model_validate(JobSpec.model_validate(job_spec([text], max_new_tokens)).normalized())
    attribution_model = loaded.attribution_model(spec.method)
    raw = attribution_model.attribute(**attribute_kwargs(attribution_model, spec, [text], None))
    return aggregate(raw, spec)
