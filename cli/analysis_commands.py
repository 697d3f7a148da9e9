"""Commands that look at results: show and compare."""

import click


def _client(ctx):
    from cli.main import client_from

    return client_from(ctx)


@click.command()
@click.argument("job_id")
@click.option("--sequence", "sequence_idx", type=click.IntRange(0), default=0, show_default=True, help="Which input of the job to show.")
@click.option("-k", "--top", "k", type=click.IntRange(1, 20), default=3, show_default=True, help="Input tokens to list per generated token.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write Inseq's HTML heatmap to this file.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), help="Also write a heatmap PNG to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the top tokens as JSON records.")
@click.pass_context
def show(ctx, job_id, sequence_idx, k, html_path, png_path, as_json):
    """Show the top attributed input tokens for each generated token of a job."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from cli.output import echo_json
    from pipeline.analysis import top_tokens
    from pipeline.errors import ConfigError
    from pipeline.plots import format_token

    client = _client(ctx)
    client.summary(job_id)
    attributions = client.table(job_id, "attributions")
    selected = attributions[attributions["sequence_idx"] == sequence_idx]
    if selected.empty:
        raise ConfigError(f"Job {job_id!r} has no sequence {sequence_idx}; it has {attributions['sequence_idx'].nunique()} (0-based)")
    top = top_tokens(selected, k=k)

    if html_path:
        Path(html_path).write_text(client.report_html(job_id), encoding="utf-8")
    if png_path:
        from pipeline.plots import plot_heatmap

        plot_heatmap(selected, sequence_idx=sequence_idx, title=f"{job_id} ({selected['method'].iloc[0]})", path=png_path)

    if as_json:
        echo_json(top.to_dict(orient="records"))
        return
    table = Table(title=f"{job_id}, sequence {sequence_idx}: top {k} input tokens", header_style="bold")
    table.add_column("step", justify="right")
    table.add_column("generated")
    for rank in range(1, k + 1):
        table.add_column(f"#{rank}")
    for (target_idx, target_token), rows in top.groupby(["target_idx", "target_token"], sort=True):
        cells = [f"{format_token(row.input_token)} {row.score:.3f}" for row in rows.sort_values("rank").itertuples()]
        table.add_row(str(target_idx), format_token(target_token), *cells)
    console = Console()
    console.print(table)
    for path in (html_path, png_path):
        if path:
            console.print(f"Wrote {path}")


@click.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("-k", "--top", "k", type=click.IntRange(1, 20), default=3, show_default=True, help="Size of the top-k input sets compared.")
@click.option("--absolute", is_flag=True, help="Rank by |score| instead of the signed score.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), help="Write side-by-side heatmaps of the first sequence to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-pair summary as JSON records.")
@click.pass_context
def compare(ctx, job_ids, k, absolute, png_path, as_json):
    """Compare jobs that attributed the same inputs with different methods."""
    from rich.console import Console
    from rich.table import Table

    from cli.output import echo_json
    from pipeline.analysis import compare_methods
    from pipeline.errors import ConfigError

    if len(job_ids) < 2:
        raise ConfigError("Give at least two job ids to compare")
    client = _client(ctx)
    frames = {}
    for job_id in job_ids:
        client.summary(job_id)
        frames[job_id] = client.table(job_id, "attributions")
    result = compare_methods(frames, k=k, absolute=absolute)

    if png_path:
        from pipeline.plots import plot_method_comparison

        labelled = {f"{job_id} ({frame['method'].iloc[0]})": frame for job_id, frame in frames.items()}
        plot_method_comparison(labelled, path=png_path)

    if as_json:
        echo_json(result.pairs.to_dict(orient="records"))
        return
    table = Table(title=f"Agreement between jobs (top-{k} overlap, Spearman rank correlation)", header_style="bold")
    for column in ("job a", "job b", "tokens", "pooled Spearman", "mean Spearman", f"mean top-{k} overlap"):
        table.add_column(column)
    for row in result.pairs.itertuples():
        table.add_row(row.job_a, row.job_b, str(row.tokens), f"{row.pooled_spearman:.3f}", f"{row.mean_spearman:.3f}", f"{row.mean_top_k_overlap:.2f}")
    console = Console()
    console.print(table)
    if png_path:
        console.print(f"Wrote {png_path}")


COMMANDS = [show, compare]
