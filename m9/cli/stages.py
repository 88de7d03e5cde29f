"""`m9 ingest`, `m9 embed`, `m9 reduce`, `m9 evaluate`, `m9 report`: one stage each."""

from __future__ import annotations

import click

from m9.cli.options import (
    EMBED_OPTIONS,
    INGEST_OPTIONS,
    REDUCE_OPTIONS,
    config_fields,
    decode_memory_opt,
    images_per_file_opt,
    input_opt,
    neighbors_opt,
    options,
    output_opt,
    overwrite_opt,
    tolerating_rejections,
    user_errors,
    workdir_opt,
)
from m9.stages import contract


def ignored(result) -> str:
    """What ingest left out (from its Manifest): other files, hidden ones (names starting with '.' or '_',
    never read), and unreadable ones (dangling symlinks, no permission) with their reasons."""
    counts = result.counts
    text = f"{counts['ignored_files']} other files and {counts.get('hidden_files', 0)} hidden files ignored"
    if counts.get("unreadable_files"):
        from m9.stages.listing import unreadable_summary

        text += f", {counts['unreadable_files']} unreadable: {unreadable_summary(result.details['unreadable_reasons'])}"
    return text


def k_summary(red: dict) -> str:
    """`k=50`, or with --k auto `k=37 (auto:0.95: the smallest k whose …)`; with a kept basis
    `k=50 on the basis kept from 2026-12-04T01:00:00+00:00 (240 images)`."""
    choice = red.get("k_choice")
    basis = red.get("basis") or {}
    kept = (
        f" on the basis kept from {basis['fitted_at']} ({basis['fitted_rows']} images)"
        if basis.get("kind") == "kept"
        else ""
    )
    return f"k={red['k']}" + (f" ({choice['rule']}: {choice['why']})" if choice else "") + kept


def evaluate_summary(result: dict) -> str:
    """`PCA-50 91.2 %, full 1280-d 92.0 %, raw pixels 80.1 %`."""
    dims = result["dims"]
    names = {
        contract.PCA_SPACE: f"PCA-{dims.get(contract.PCA_SPACE)}",
        contract.FULL_SPACE: f"full {dims[contract.FULL_SPACE]}-d",
        contract.RAW_SPACE: "raw pixels",
    }
    accuracy = result["accuracy"]
    return ", ".join(f"{names[n]} {100 * accuracy[n]:.1f} %" for n in contract.SPACES if n in accuracy)


@click.command()
@input_opt(default=None, help="Image folder or s3:// prefix (default: the bundled sample).")
@output_opt(
    default=contract.default_output(contract.INGEST), show_default=True, help="Parquet output folder or s3:// URI."
)
@images_per_file_opt
@options(*INGEST_OPTIONS)
@overwrite_opt
@user_errors
def ingest(input_, output, overwrite, **settings):
    """Read images (recursively; symlinks followed) into Parquet with ids, labels and splits.

    Example: m9 ingest --input ~/fruits-360 --output m9-out/images
    """
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest as run_ingest
    from m9.stages.pipeline import sample_dir

    cfg = IngestConfig(
        input=input_ or sample_dir(), output=output, overwrite=overwrite, **config_fields(IngestConfig, settings)
    )
    result = run_ingest(cfg)
    c = result.counts
    click.echo(
        f"ingest: {c['rows']} images into {c['parquet_files']} Parquet files at {output}"
        f" ({ignored(result)}){' — already done' if result.skipped else ''}{updated(result)}"
    )


def updated(result) -> str:
    """`; updated: 5 read, 1 removed, 236 unchanged` for an ingest that updated its output, else ""."""
    c = result.counts
    if result.skipped or not result.details.get("update"):
        return ""
    return f"; updated: {c['added']} read, {c['removed']} removed, {c['unchanged']} unchanged"


@click.command()
@input_opt(default=contract.default_output(contract.INGEST), show_default=True, help="Output of `m9 ingest`.")
@output_opt(default=contract.default_output(contract.EMBED), show_default=True, help="Embeddings output folder.")
@options(*EMBED_OPTIONS)
@overwrite_opt
@user_errors
def embed(input_, output, overwrite, **settings):
    """Embed ingested images with MobileNetV2 on a fixed pool of Ray actors.

    Example: m9 embed --actors 2 --batch-size 8
    """
    from m9.config import EmbedConfig
    from m9.stages.embed import embed as run_embed

    cfg = EmbedConfig(input=input_, output=output, overwrite=overwrite, **config_fields(EmbedConfig, settings))
    result, too_many = tolerating_rejections(run_embed, cfg)
    c = result.counts
    click.echo(
        f"embed: {c['embedded']} embedded, {c['rejected']} rejected (of {c['rows_in']}), "
        f"{c.get('computed', 0)} computed, {c.get('reused', 0)} reused, "
        f"{c['model_loads']} model loads, output at {output}"
        f"{' — already done' if result.skipped else ''}"
    )
    if too_many:
        raise click.ClickException(str(too_many))


@click.command()
@input_opt(default=contract.default_output(contract.EMBED), show_default=True, help="Output of `m9 embed`.")
@output_opt(default=contract.default_output(contract.REDUCE), show_default=True, help="PCA output folder.")
@options(*REDUCE_OPTIONS)
@overwrite_opt
@user_errors
def reduce(input_, output, overwrite, **settings):
    """PCA of the embeddings (centered; the covariance in one Spark scan): Parquet, CSV, variance.json and the
    basis; with --basis keep, a changed input is projected onto the basis already there.

    Example: m9 reduce --k 50 --basis keep
    """
    from m9.config import ReduceConfig
    from m9.stages.reduce import reduce as run_reduce

    cfg = ReduceConfig(input=input_, output=output, overwrite=overwrite, **config_fields(ReduceConfig, settings))
    result = run_reduce(cfg)
    click.echo(
        f"reduce: {result.counts['rows']} rows → {k_summary(result.details)}, explaining "
        f"{100 * result.details['total_explained']:.1f} % of the variance, output at {output}"
        f"{' — already done' if result.skipped else ''}"
    )


@click.command()
@input_opt(
    default=contract.default_output(contract.REDUCE),
    show_default=True,
    help="Output of `m9 reduce` (or of `m9 embed`: then without the PCA space).",
)
@output_opt(default=contract.default_output(contract.EVALUATE), show_default=True, help="Folder for evaluate.json.")
@neighbors_opt
@decode_memory_opt
@overwrite_opt
@user_errors
def evaluate(input_, output, neighbors, decode_memory_mb, overwrite):
    """Are the features any good? kNN classification of the label in the PCA space, the full feature space
    and raw 28x28 grey pixels of the same images (Training → Test, or stratified folds without a split).

    Example: m9 evaluate --input m9-out/reduce --neighbors 5
    """
    from m9.stages import evaluate as stage

    cfg = stage.EvaluateConfig(
        input=input_, output=output, neighbors=neighbors, decode_memory_mb=decode_memory_mb, overwrite=overwrite
    )
    done = stage.evaluate(cfg)
    result = stage.result(output)
    left_out = f", {result['raw_left_out']} images left out of raw pixels" if result.get("raw_left_out") else ""
    click.echo(
        f"evaluate: {neighbors}-NN accuracy of the label on {result['counts']['scored']} images "
        f"({result['protocol']}{', ' + result['model'] if result.get('model') else ''}): "
        f"{evaluate_summary(result)}{left_out}; details in "
        f"{output}/{contract.EVALUATE_NAME}{' — already done' if done.skipped else ''}"
    )
    from m9.cli.neighbors import without_leaked

    for line in without_leaked(result):
        click.echo(line)


_READ = [f"{c.folder}/" for c in (contract.INGEST, contract.EMBED, contract.REDUCE, contract.EVALUATE)]


@click.command()
@workdir_opt(help=f"The folder `m9 run` worked in (its {', '.join(_READ[:-1])} and {_READ[-1]}).")
@overwrite_opt
@user_errors
def report(workdir, overwrite):
    """Write WORKDIR/report/report.html: run summary, variance, PC1 x PC2, nearest neighbours, evaluate
    figures, all inlined (it opens anywhere, offline); the figures also as PNGs beside it.

    Example: m9 report --workdir m9-out
    """
    from m9.stages import report as stage

    done = stage.report(workdir, overwrite=overwrite)
    click.echo(f"report: {stage.page(workdir)}{' — already done' if done.skipped else ''}")


COMMANDS = (ingest, embed, reduce, evaluate, report)
