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


COMMANDS = [show]
