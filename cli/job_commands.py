"""Commands that submit and follow jobs: submit, status, list, wait, cancel, retry, download."""

import click

from cli.output import echo_json, print_records, progress_text

STATES = ("submitted", "queued", "running", "succeeded", "failed", "rejected", "cancelled")


def _client(ctx):
    from cli.main import client_from

    return client_from(ctx)


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--spec", "spec_file", type=click.File("rb"), help="Read the whole spec from a JSON file ('-' for stdin); other options override its fields.")
@click.option("--job-id", help="Job id to use instead of a generated one.")
@click.option("--model", help="Model: 'smollm2-135m-instruct' (bundled), a hub id, a .gguf file or an s3:// prefix.")
@click.option("--method", help="Inseq attribution method (see 'tokviz methods').")
@click.option("--step-score", "step_scores", multiple=True, help="Step score to compute per generated token; repeat for several.")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), help="Tokens to generate per input.")
@click.option("--n-steps", type=click.IntRange(1, 500), help="Integration steps for integrated-gradients methods.")
@click.option("--generated-text", "generated_texts", multiple=True, help="Force this output for the matching input (repeat in input order).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label copied into every table row; repeat for several.")
@click.option("--wait", "wait_for_it", is_flag=True, help="Wait for the job to finish, showing progress.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def submit(ctx, texts, spec_file, job_id, model, method, step_scores, max_new_tokens, n_steps, generated_texts, labels, wait_for_it, timeout, as_json):
    """Submit a job for TEXTS (or for the inputs in --spec FILE)."""
    from pipeline.errors import ConfigError

    spec = _load_spec_file(spec_file) if spec_file else {}
    overrides = {"model": model, "method": method, "n_steps": n_steps}
    spec.update({name: value for name, value in overrides.items() if value is not None})
    if texts:
        spec.pop("input_text", None)
        spec["input_texts"] = list(texts)
    if step_scores:
        spec["step_scores"] = list(step_scores)
    if generated_texts:
        spec["generated_texts"] = list(generated_texts)
    if max_new_tokens is not None:
        spec["generation_args"] = {**spec.get("generation_args", {}), "max_new_tokens": max_new_tokens}
    if labels:
        spec["labels"] = {**spec.get("labels", {}), **_parse_labels(labels)}
    if not any(name in spec for name in ("input_text", "input_texts", "inputs_uri")):
        raise ConfigError("No input given; pass texts as arguments or a spec file with --spec")

    client = _client(ctx)
    job_id = client.submit(spec, job_id=job_id)
    if not wait_for_it:
        echo_json({"job_id": job_id, "state": "submitted"}) if as_json else click.echo(job_id)
        return
    if not as_json:
        click.echo(f"Submitted {job_id}", err=True)
    _wait_and_report(client, job_id, timeout, as_json)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status record as JSON.")
@click.pass_context
def status(ctx, job_id, as_json):
    """Show a job's state, progress and errors."""
    record = _client(ctx).status(job_id)
    if as_json:
        echo_json(record)
        return
    click.echo(f"{record['job_id']}: {record['state']}")
    if record.get("attempt"):
        click.echo(f"  attempt {record['attempt']} of {record.get('max_attempts')}")
    if progress_text(record):
        click.echo(f"  progress {progress_text(record)} inputs")
    if record.get("message"):
        click.echo(f"  message: {record['message']}")
    for error in record.get("errors") or []:
        click.echo(f"  error (attempt {error['attempt']}): {error['message']}")


@click.command(name="list")
@click.option("--state", type=click.Choice(STATES), help="Show only jobs in this state.")
@click.option("--limit", type=click.IntRange(1), help="Show at most this many jobs (newest first).")
@click.option("--json", "as_json", is_flag=True, help="Print the status records as JSON.")
@click.pass_context
def list_jobs(ctx, state, limit, as_json):
    """List jobs, newest first."""
    records = _client(ctx).list(state=state, limit=limit)
    if as_json:
        echo_json(records)
    elif records:
        print_records(records)
    else:
        click.echo("No jobs.")


@click.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit code 6).")
@click.option("--json", "as_json", is_flag=True, help="Print the final status record as JSON.")
@click.pass_context
def wait(ctx, job_id, timeout, as_json):
    """Wait for a job to finish, with a progress bar; exit 5 unless it succeeded."""
    _wait_and_report(_client(ctx), job_id, timeout, as_json)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status record as JSON.")
@click.pass_context
def cancel(ctx, job_id, as_json):
    """Cancel a queued or running job (a running job stops at its next heartbeat)."""
    record = _client(ctx).cancel(job_id)
    if as_json:
        echo_json(record)
    elif record["state"] == "cancelled":
        click.echo(f"{job_id}: cancelled")
    else:
        click.echo(f"{job_id}: {record['state']}; cancellation requested, it stops before its next chunk")


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status record as JSON.")
@click.pass_context
def retry(ctx, job_id, as_json):
    """Queue a failed or cancelled job again."""
    record = _client(ctx).retry(job_id)
    echo_json(record) if as_json else click.echo(f"{job_id}: {record['state']}")


@click.command()
@click.argument("job_id")
@click.option("-o", "--output", "target", type=click.Path(file_okay=False), default=None, help="Folder to write into [default: ./JOB_ID].")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
@click.pass_context
def download(ctx, job_id, target, as_json):
    """Download a finished job's results and table parts into a folder."""
    paths = _client(ctx).download(job_id, target or job_id)
    if as_json:
        echo_json([str(path) for path in paths])
        return
    for path in paths:
        click.echo(str(path))


def _wait_and_report(client, job_id: str, timeout: float | None, as_json: bool) -> None:
    from pipeline.errors import JobFailedError

    record = _wait_with_progress(client, job_id, timeout, show=not as_json)
    if as_json:
        echo_json(record)
    else:
        click.echo(f"{job_id}: {record['state']}" + (f" ({record['message']})" if record.get("message") else ""))
    if record["state"] != "succeeded":
        raise JobFailedError(f"Job {job_id!r} ended {record['state']}: {record.get('message') or 'no message'}")


def _wait_with_progress(client, job_id: str, timeout: float | None, show: bool) -> dict:
    return client.wait(job_id, timeout=timeout, raise_on_failure=False, progress=show)


def _load_spec_file(handle) -> dict:
    from pipeline.errors import ConfigError
    from pipeline.spec import decode_body

    try:
        return decode_body(handle.read())
    except Exception as exc:
        raise ConfigError(f"Invalid spec file {handle.name!r}: {exc}") from exc


def _parse_labels(labels) -> dict:
    from pipeline.errors import ConfigError

    parsed = {}
    for label in labels:
        key, separator, value = label.partition("=")
        if not separator or not key:
            raise ConfigError(f"Invalid label {label!r}; write it as KEY=VALUE")
        parsed[key] = value
    return parsed


COMMANDS = [submit, status, list_jobs, wait, cancel, retry, download]
