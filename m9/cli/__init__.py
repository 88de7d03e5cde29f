"""The `m9` command: a thin click layer over the stage functions; only this package prints.

`main` is the group (the global options); the commands live by role in options.py (what they share),
stages.py (one stage each), neighbors.py (duplicates, index, search), run.py (`m9 run`), assets.py
(weights, jars, data), bench.py and store.py (`m9 store`).
"""

from __future__ import annotations

import logging
import sys

import click

from m9 import __version__


class _CurrentStderr:
    """sys.stderr as it is when a line is written: while a progress display is live, rich swaps in a proxy
    that prints log lines above the display instead of through it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=_CurrentStderr(),
    )
    logging.getLogger("m9").setLevel(logging.DEBUG if verbose else logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m9")
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
@click.option(
    "--s3-endpoint",
    default=None,
    metavar="URL",
    help="S3-compatible store for s3:// URIs (MinIO, Ceph, moto), e.g. http://127.0.0.1:9000; "
    "default: $M9_S3_ENDPOINT, $AWS_ENDPOINT_URL, else AWS. Credentials and region come from "
    "the usual AWS environment and config.",
)
@click.pass_context
def main(ctx: click.Context, verbose: bool, s3_endpoint: str | None) -> None:
    """m9: images → MobileNetV2 feature vectors → PCA, on Spark and Ray, local or on EMR.

    Example: m9 run   (the whole pipeline on the bundled sample, outputs in ./m9-out/)
    """
    _setup_logging(verbose)
    if s3_endpoint and not s3_endpoint.startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{s3_endpoint!r} is not a URL; give one such as http://127.0.0.1:9000", param_hint="--s3-endpoint"
        )
    from m9.io import storage

    # In force for the command that follows (pyarrow, boto3, s3a, and the settings Ray tasks are handed),
    # and gone when it returns; the process's environment is left as it was.
    ctx.with_resource(storage.using(storage.S3Settings.from_env(endpoint=s3_endpoint)))
    from m9.ui import quiet

    # The engines stay quiet for this command unless -v (they are configured when they start).
    ctx.with_resource(quiet.verbosity(verbose))


def _add_commands() -> None:
    from m9.cli import assets, bench, neighbors, precision, run, stages, store

    for module in (stages, neighbors, run, assets, bench, store, precision):
        for command in module.COMMANDS:
            main.add_command(command)


_add_commands()

if __name__ == "__main__":
    main()
