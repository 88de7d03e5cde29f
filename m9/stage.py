"""What every stage shares: its manifest (the commit marker of a finished output) and the output guard."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from m9 import __version__, storage
from m9.errors import InputError

#: The file a stage writes last into its output folder; its presence means the output is complete.
MANIFEST = "_m9.json"

#: Names a stage may leave in its own output while it runs: a re-run may replace them without asking.
_OWN_FILES = re.compile(r"^(part-.*|_SUCCESS|_temporary|\.part-.*|\..*\.crc|_m9.*|errors|embeddings|.*\.tmp-.*)$")


#: The columns a stage reads from the stage before it: checked up front, so that passing the wrong
#: folder (an embed output to embed, the images to reduce) is one clear error, not an engine's traceback.
INGEST_COLUMNS = ("image_id", "path", "label", "split", "content")
EMBED_COLUMNS = ("image_id", "path", "label", "split", "features")

#: A column only one stage writes, to say whose output a folder looks like.
_SIGNATURES = (("features", "m9 embed"), ("pca", "m9 reduce"), ("content", "m9 ingest"))


def check_columns(src: str, parquet_file: str, needed: tuple[str, ...], producer: str) -> None:
    """Raise InputError unless parquet_file (one file of the input src) has the columns `needed`, which
    `producer` (e.g. "m9 ingest") writes. Reads the file's footer only."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(parquet_file)
    names = set(pq.read_schema(path, filesystem=fs).names)
    missing = [c for c in needed if c not in names]
    if not missing:
        return
    looks = next((f" (it looks like `{who}`'s output)" for col, who in _SIGNATURES if col in names), "")
    columns = f"column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    fix = f"pass the folder `{producer}` wrote"
    raise InputError(f"{src} is not `{producer}`'s output{looks}: its Parquet has no {columns}; {fix}")


def read_manifest(output: str) -> dict | None:
    """The manifest of a finished stage output, or None."""
    return storage.read_json(storage.join(output, MANIFEST))


def write_manifest(output: str, stage: str, input: str, counts: dict, **extra) -> dict:
    """Mark output as finished by stage, with what it read and what it counted."""
    manifest = {
        "stage": stage,
        "m9_version": __version__,
        "input": input,
        "counts": counts,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    storage.write_json(storage.join(output, MANIFEST), manifest)
    return manifest


def check_not_a_file(output: str) -> None:
    """Refuse a local output that is, or lies under, a file (it would be a traceback later, or with
    --overwrite the file would be deleted). S3 has no such thing: a key and a prefix may share a name."""
    if storage.is_s3(output):
        return
    path = Path(output)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"lies under {candidate}, which is"
                raise InputError(f"output {output} {where} a file, not a folder; choose a folder")
            return


def guard_output(output: str, stage: str, input: str, overwrite: bool) -> dict | None:
    """Decide what to do with an existing output folder before a stage writes into it.

    Returns the manifest when the same stage already finished on the same input (the caller may skip);
    clears the folder when overwrite is set; raises InputError when it holds something else.
    """
    check_not_a_file(output)
    if overwrite:
        storage.remove(output)
        return None
    manifest = read_manifest(output)
    if manifest is not None:
        if manifest.get("stage") == stage and manifest.get("input") == input:
            return manifest
        raise InputError(
            f"{output} holds the output of `m9 {manifest.get('stage')}` on {manifest.get('input')}; "
            f"choose another output folder or pass --overwrite to replace it"
        )
    if not storage.exists(output):
        return None
    fs, path = storage.filesystem(output)
    import pyarrow.fs as pafs

    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    foreign = [n for n in names if not _OWN_FILES.match(n)]
    if foreign:
        raise InputError(
            f"{output} already holds files m9 did not write (e.g. {sorted(foreign)[0]}); "
            f"choose another output folder or pass --overwrite to replace it"
        )
    return None
