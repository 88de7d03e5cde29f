"""`m9 precision compare`: int8 against FP32 on the user's own images."""

from __future__ import annotations

import json

import click

from m9.cli.options import input_opt, neighbors_opt, user_errors
from m9.model.compare import DEFAULT_LIMIT


@click.group()
def precision():
    """The model's number formats (fp32, int8) compared."""


@precision.command("compare")
@input_opt(required=True, help="An `m9 ingest` output, an `m9 embed` output (its images), or a folder of images.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="Images compared (the first by image id or path).",
)
@neighbors_opt
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@user_errors
def compare(input_, limit, neighbors, as_json):
    """Embed the images with the fp32 and the int8 model (one process) and print the cosine between each
    image's two feature vectors (mean, 1st percentile, min) against m9's bar, and the kNN accuracy of the
    label in each precision when the images have labels.

    Example: m9 precision compare --input m9-out/images --limit 1000
    """
    from m9.model.compare import compare as run_compare

    r = run_compare(input_, limit=limit, neighbors=neighbors)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    verdict = "at" if r["at_bar"] else "BELOW"
    click.echo(
        f"precision: int8 vs fp32 on {r['images'] - r['rejected']} images of {r['input']}: cosine mean "
        f"{r['cosine_mean']:.4f}, p1 {r['cosine_p1']:.4f}, min {r['cosine_min']:.4f} ({verdict} the bar: mean ≥ "
        f"{r['bar']['cosine_mean']}, p1 ≥ {r['bar']['cosine_p1']})"
    )
    if f"knn{neighbors}_fp32" in r:
        click.echo(
            f"  {neighbors}-NN accuracy ({r['knn_protocol']}): fp32 {100 * r[f'knn{neighbors}_fp32']:.1f} %, "
            f"int8 {100 * r[f'knn{neighbors}_int8']:.1f} %"
        )


COMMANDS = (precision,)
