"""Search: the images of a workdir most like a given one (an image file, or an image of the workdir by id)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from m9.errors import InputError
from m9.io import storage
from m9.neighbors import features
from m9.neighbors import index as m9index
from m9.stages import lifecycle
from m9.stages.contract import INDEX

log = logging.getLogger(__name__)


def output_dir(workdir: str, folder: str) -> str:
    """Where a neighbour stage writes for `workdir`: its subfolder when workdir is an `m9 run` workdir, else
    (an embed output) a folder beside it."""
    work = storage.normalize(workdir)
    found = features.locate(work)
    if found.embed != work:
        return storage.join(work, folder)
    parent = work.rstrip("/").rsplit("/", 1)[0] if "/" in work.rstrip("/") else "."
    return storage.join(parent, folder)


def embed_image(path: str, embed_dir: str) -> np.ndarray:
    """A query image's unit-length features, through the decode and model path embed took for embed_dir
    (its runtime, the verified weights). InputError for a file that is not an image m9 can read."""
    from m9.model.embedder import Embedder
    from m9.model.spec import resolve_model

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--image {path}: no such file")
    manifest = lifecycle.read_manifest(embed_dir)
    made = manifest.fingerprint if manifest else {}
    model = resolve_model(
        runtime=made.get("runtime", "onnx"),
        precision=made.get("precision", "fp32"),
        decode_memory_mb=made.get("decode_memory_mb", 2048),
    )
    differs = [k for k, v in model.identity().items() if k in made and made[k] != v]
    if differs:
        raise InputError(
            f"the features in {embed_dir} were made with another model ({', '.join(differs)} differ from the "
            f"verified weights'); search them by --id"
        )
    embedder = Embedder(model, batch_size=1)
    values, errors = embedder.embed([file.read_bytes()])
    if errors[0] is not None:
        raise InputError(f"--image {path} is not an image m9 can read: {errors[0]}")
    return features.normalize(values.astype(np.float32))


def search(
    workdir: str,
    image: str | None = None,
    image_id: str | None = None,
    top: int = m9index.DEFAULT_TOP,
    nprobe: int | None = None,
    index_dir: str | None = None,
) -> list[dict]:
    """The top images most like the query, best first: rank, similarity, image_id, path, label, split.
    A query given by id is left out of its own results."""
    if (image is None) == (image_id is None):
        raise InputError("search needs exactly one of --image FILE or --id ID")
    if top < 1:
        raise InputError("--top must be at least 1")
    folders = features.locate(workdir)
    where = index_dir or output_dir(workdir, INDEX.folder)
    kept = m9index.load(where)
    if image is not None:
        query = embed_image(image, folders.embed)
    else:
        assert image_id is not None  # exactly one of the two (checked above)
        _, query = features.read_by_ids(folders.embed, [image_id])
        if not len(query):
            raise InputError(f"--id {image_id}: no embedded image has this id in {folders.embed}")
    extra = 1 if image_id is not None else 0
    sims, ids = m9index.search(kept.index, query, top + extra, nprobe)
    rows = kept.row_of(ids[0])
    results: list[dict] = []
    for sim, row in zip(sims[0], rows):
        if row < 0:
            continue
        hit = {c: kept.rows.column(c)[row].as_py() for c in features.META}
        if image_id is not None and hit["image_id"] == image_id:
            continue
        results.append({"rank": len(results) + 1, "similarity": round(float(sim), 6), **hit})
    return results[:top]
