"""`m9 store show` and `m9 store drop`: what a feature store holds per model identity, and removing one."""

from __future__ import annotations

import json

import click

from m9.cli.options import user_errors

_STORE_HELP = "Feature store: auto ($M9_STORE, else ~/.cache/m9/store), a folder or an s3:// URI."


def _uri(store: str) -> str:
    from m9.errors import InputError
    from m9.stages.reuse import resolve_store

    # auto for a store command means the local default: there is no output to take a bucket from
    uri = resolve_store(store, output=".")
    if uri is None:
        raise InputError("--store none names no store; give auto, a folder or an s3:// URI")
    return uri


store_opt = click.option("--store", default="auto", show_default=True, metavar="auto|URI", help=_STORE_HELP)


@click.group()
def store():
    """The feature store `m9 embed` asks before it runs the model (see `m9 embed --store`).

    Example: m9 store show
    """


@store.command()
@store_opt
@user_errors
def show(store):
    """Entries, rejections, parts and bytes per model identity, with the identity itself.

    Example: m9 store show --store s3://my-bucket/store
    """
    from m9.store import FeatureStore

    uri = _uri(store)
    found = FeatureStore(uri).show()
    if not found:
        click.echo(f"store {uri}: empty")
        return
    click.echo(f"store {uri}:")
    for e in found:
        identity = json.dumps(e.identity, sort_keys=True) if e.identity else "none (nothing is served)"
        click.echo(
            f"  {e.digest}  {e.entries} entries ({e.rejections} rejections), {e.parts} parts, "
            f"{e.bytes / 2**20:.1f} MB\n    identity {identity}"
        )


@store.command()
@click.option("--identity", "identity", required=True, metavar="DIGEST", help="Digest (or a unique prefix) to drop.")
@store_opt
@user_errors
def drop(identity, store):
    """Remove every entry of one model identity (its digest as `m9 store show` prints it).

    Example: m9 store drop --identity 3f2a9c01d4e5b6a7
    """
    from m9.store import FeatureStore

    uri = _uri(store)
    click.echo(f"store {uri}: dropped {FeatureStore(uri).drop(identity)}")


@store.command()
@store_opt
@user_errors
def compact(store):
    """Merge each identity's parts into one, so a lookup reads one file per identity.

    Example: m9 store compact
    """
    from m9.store import FeatureStore

    uri = _uri(store)
    fs = FeatureStore(uri)
    for e in fs.show():
        if e.identity is None:
            continue
        replaced, kept = fs.model(e.identity).compact()
        done = f"{replaced} parts merged into one" if replaced else "one part already"
        click.echo(f"store {uri}: {e.digest}: {done}, {kept} rows")


COMMANDS = (store,)
