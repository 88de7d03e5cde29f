"""`m9 duplicates`, `m9 index`, `m9 search`: using the features (m9.neighbors)."""

from __future__ import annotations

import click

from m9.cli.options import overwrite_opt, user_errors
from m9.config import DEFAULT_THRESHOLD, DEFAULT_TOP, DEFAULT_WORKDIR, INDEX_KINDS
from m9.stages import contract


def duplicates_line(c: dict) -> str:
    return (
        f"{c['groups']} groups of {c['images_in_groups']} images; {c['crossing_groups']} cross the Training/Test "
        f"split ({c['leaked_test_images']} Test images leaked)"
    )


def without_leaked(result: dict) -> list[str]:
    """evaluate's accuracy with the leaked Test images left out, as summary lines (none without a split)."""
    honest = result.get("without_leaked")
    if not honest:
        return []
    pca, full, raw = contract.SPACES
    names = {pca: f"PCA-{result['dims'].get(pca)}", full: f"full {result['dims'][full]}-d", raw: "raw pixels"}
    scored = honest["accuracy"]
    accuracy = ", ".join(f"{names[n]} {100 * scored[n]:.1f} %" for n in contract.SPACES if n in scored)
    return [f"  without leaked    {accuracy}  ({honest['leaked_test_images']} leaked Test images left out)"]


workdir_features_opt = click.option(
    "--workdir",
    default=DEFAULT_WORKDIR,
    show_default=True,
    help="The folder `m9 run` worked in (its embed/ holds the features), or an `m9 embed` output.",
)


@click.command()
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

    out = output or output_dir(workdir, contract.DUPLICATES.folder)
    result = run_duplicates(DuplicatesConfig(input=workdir, output=out, threshold=threshold, overwrite=overwrite))
    click.echo(_duplicates_summary(result.counts, out) + (" — already done" if result.skipped else ""))


def _duplicates_summary(c: dict, out: str) -> str:
    return (
        f"duplicates: {c['groups']} groups of {c['images_in_groups']} images among {c['images']}; "
        f"{c['crossing_groups']} cross the Training/Test split ({c['leaked_test_images']} Test images leaked); "
        f"table at {out}/duplicates.parquet"
    )


@click.command()
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

    out = output or output_dir(workdir, contract.INDEX.folder)
    result = run_index(IndexConfig(input=workdir, output=out, kind=kind, overwrite=overwrite))
    c, d = result.counts, result.details
    cells = f", {d['cells']} cells" if d.get("cells") else ""
    click.echo(
        f"index: {c['vectors']} vectors ({d['kind']}{cells}) at {out}"
        + (" — already up to date" if result.skipped else f"; {c['added']} added, {c['removed']} removed")
    )


@click.command()
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


COMMANDS = (duplicates, index, search)
