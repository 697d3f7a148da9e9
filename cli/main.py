"""The `tokviz` command line.

No business logic lives here: each command parses options, calls `pipeline`, and
prints. torch, transformers, inseq and pandas are imported inside the commands that
need them, so `tokviz --help` starts fast.
"""

import sys

import click

from cli.output import fail

EXIT_CODES_HELP = """Exit codes: 0 success; 1 other error; 2 invalid spec or options;
3 job not found; 4 job in the wrong state; 5 job ended failed, rejected or cancelled;
6 wait timed out; 7 object store error; 8 model could not be loaded; 9 attribution failed."""


class TokvizGroup(click.Group):
    """Turns tokviz errors into one `Error: ...` line and the class's exit code."""

    def invoke(self, ctx):
        from pipeline.errors import TokvizError

        try:
            return super().invoke(ctx)
        except TokvizError as exc:
            fail(str(exc), exc.exit_code)


@click.group(cls=TokvizGroup, epilog=EXIT_CODES_HELP)
@click.option("--bucket", envvar="TOKVIZ_BUCKET", help="Bucket holding the jobs [env TOKVIZ_BUCKET].")
@click.option("--prefix", envvar="TOKVIZ_PREFIX", default="", show_default=False, help="Key prefix inside the bucket [env TOKVIZ_PREFIX].")
@click.option("--endpoint-url", envvar=["TOKVIZ_ENDPOINT_URL", "AWS_ENDPOINT_URL"], help="S3 endpoint for S3-compatible stores [env TOKVIZ_ENDPOINT_URL].")
@click.version_option(package_name="tokviz")
@click.pass_context
def main(ctx, bucket, prefix, endpoint_url):
    """Run Inseq feature attribution jobs through an S3 bucket."""
    ctx.obj = {"bucket": bucket, "prefix": prefix or "", "endpoint_url": endpoint_url}


def client_from(ctx):
    """Build the Python client from the global options."""
    from pipeline.client import Client
    from pipeline.errors import ConfigError

    options = ctx.find_root().obj
    if not options["bucket"]:
        raise ConfigError("No bucket given; pass --bucket NAME or set TOKVIZ_BUCKET")
    return Client(options["bucket"], options["prefix"], options["endpoint_url"])


def register_commands() -> None:
    from cli import analysis_commands, job_commands, server_commands

    for module in (job_commands, server_commands, analysis_commands):
        for command in module.COMMANDS:
            main.add_command(command)


register_commands()


if __name__ == "__main__":
    sys.exit(main())
