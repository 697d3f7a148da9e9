"""Commands that run things: worker, local-s3, demo, methods."""

import os
import time

import click


@click.command()
@click.option("--once", is_flag=True, help="Process what is waiting, then exit.")
@click.option("--max-jobs", type=click.IntRange(1), help="Exit after running this many jobs.")
@click.option("--poll-interval", type=click.FloatRange(0.05), default=5.0, show_default=True, help="Seconds between polls when idle.")
@click.option("--max-idle", type=click.FloatRange(0), help="Exit after this many idle seconds.")
@click.option("--lease-seconds", type=click.IntRange(3, 3600), default=60, show_default=True, help="Lease length; the heartbeat renews it every third of this.")
@click.option("--allow-local-models", is_flag=True, envvar="TOKVIZ_ALLOW_LOCAL_MODELS", help="Allow specs to name local model directories and .gguf files [env TOKVIZ_ALLOW_LOCAL_MODELS].")
@click.option("--model-allowlist", envvar="TOKVIZ_MODEL_ALLOWLIST", help="Comma-separated model names or glob patterns this worker may load [env TOKVIZ_MODEL_ALLOWLIST].")
@click.option("--cache-dir", type=click.Path(file_okay=False), envvar="TOKVIZ_CACHE_DIR", help="Where converted model weights are cached [env TOKVIZ_CACHE_DIR].")
@click.option("--log-json", is_flag=True, envvar="TOKVIZ_LOG_JSON", help="Log JSON lines instead of text.")
@click.option(
    "--batch-jobs", type=click.IntRange(1, 64), default=8, show_default=True,
    help="Maximum number of small queued jobs with the same model, method and settings that share Inseq calls (64 inputs at most per group; only inputs of one token length share a call). 1 runs every job alone. See docs/batching.md.",
)
@click.pass_context
def worker(ctx, once, max_jobs, poll_interval, max_idle, lease_seconds, allow_local_models, model_allowlist, cache_dir, log_json, batch_jobs):
    """Poll the bucket's inbox and run jobs until stopped (SIGINT/SIGTERM stop cleanly)."""
    from cli.main import client_from
    from handlers.worker import LoopSettings, WorkerLoop
    from pipeline.logs import configure_logging
    from pipeline.models import ModelCache
    from pipeline.worker import Worker, WorkerConfig

    configure_logging(json_lines=log_json)
    client = client_from(ctx)
    client.store.check_bucket()
    allowlist = tuple(item.strip() for item in (model_allowlist or "").split(",") if item.strip())
    config = WorkerConfig(lease_seconds=lease_seconds, allow_local_models=allow_local_models, model_allowlist=allowlist, max_batch_jobs=batch_jobs)
    models = ModelCache(cache_dir=cache_dir, store_client=client.store.client)

    loop = WorkerLoop(Worker(client.store, client.layout, config, models), LoopSettings(poll_interval, once, max_jobs, max_idle))
    loop.install_signal_handlers()
    loop.run()


@click.command(name="local-s3")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port on 127.0.0.1.")
@click.option("--create-bucket", "buckets", multiple=True, help="Create this bucket at start; repeat for several.")
def local_s3(port, buckets):
    """Run an S3 server (moto) on 127.0.0.1 for local development.

    Its data lives in memory only: everything is lost when it stops.
    """
    import signal

    from pipeline.local_s3 import LocalS3

    # SIGTERM (e.g. `kill %1`) must also stop the moto child process, not orphan it.
    signal.signal(signal.SIGTERM, _interrupt)
    server = LocalS3(port=port)
    server.start()
    try:
        for bucket in buckets:
            server.create_bucket(bucket)
        click.echo(f"S3 server on {server.endpoint_url} (moto, in memory: data is lost when it stops). Press Ctrl-C to stop.")
        for bucket in buckets:
            click.echo(f"  created bucket {bucket}")
        click.echo(f"  export TOKVIZ_ENDPOINT_URL={server.endpoint_url} AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command()
@click.option("--text", default="The capital of France is", show_default=True, help="Input text to attribute.")
@click.option("--method", default="input_x_gradient", show_default=True, help="Inseq attribution method.")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=6, show_default=True, help="Tokens to generate.")
@click.option("--output", "target", type=click.Path(file_okay=False), default="tokviz-demo", show_default=True, help="Folder for the downloaded results.")
def demo(text, method, max_new_tokens, target):
    """Run the whole pipeline locally: S3 server, worker, job, results."""
    from pipeline.demo import run_demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_demo(text=text, method=method, max_new_tokens=max_new_tokens, target=target)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods(as_json):
    """List Inseq's attribution methods, step scores and aggregators."""
    from cli.output import echo_json
    from pipeline import registries

    data = {
        "methods": list(registries.attribution_methods()),
        "step_scores": list(registries.step_functions()),
        "aggregators": list(registries.aggregators()),
    }
    if as_json:
        echo_json(data)
        return
    for name, values in data.items():
        click.echo(f"{name.replace('_', ' ')}: {', '.join(values)}")


COMMANDS = [worker, local_s3, demo, methods]
