"""Report: one self-contained report.html (figures and data inlined, no network) of a run's workdir, and the
same figures as PNGs beside it."""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import os
import platform
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m9 import __version__
from m9.errors import InputError
from m9.io import lease, storage
from m9.stages import contract, lifecycle
from m9.stages import figures as draw
from m9.stages.contract import REPORT
from m9.stages.evaluate import model_name
from m9.stages.lifecycle import Manifest

log = logging.getLogger(__name__)

#: Points drawn in the PC1 x PC2 scatter at most: a few thousand show every label's cloud; 90,000 would
#: only paint over each other and make the PNG (and the page) heavy.
SCATTER_MAX_POINTS = 3000

#: Query images shown beside their nearest neighbours, and how many neighbours each.
QUERIES, QUERY_NEIGHBORS = 6, 5

#: The report's figures (each also a PNG beside the page: contract.figure_name).
SCREE, SCATTER, NEIGHBOURS, EVALUATION = contract.FIGURES


def machine() -> dict:
    """What the run ran on, for the report."""
    import psutil

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "m9_version": __version__,
    }


def read_pca(reduce_dir: str):
    """reduce's pca/ as (a frame of image_id, label, split; the components as an (n, k) float32 matrix)."""
    fs, path = storage.filesystem(storage.join(reduce_dir, contract.PCA_DIR))
    column = contract.PCA_COLUMN
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "label", "split", column])
    values = table.column(column).combine_chunks().flatten().to_numpy().astype(np.float32)
    x = values.reshape(table.num_rows, -1) if table.num_rows else np.zeros((0, 0), np.float32)
    return table.drop_columns([column]).to_pandas(), x


def _read(folder: str, columns: list[str]):
    fs, path = storage.filesystem(folder)
    return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()


def _rejections(embed_dir: str) -> dict[str, int]:
    """Rejected images per reason (the reason's words before the first ':')."""
    files = storage.list_files(storage.join(embed_dir, contract.ERRORS), ".parquet")
    if not files:
        return {}
    errors = _read(storage.join(embed_dir, contract.ERRORS), ["error"])
    return dict(Counter(e.split(":", 1)[0] for e in errors["error"]).most_common())


def _contents(images_dir: str, wanted: set[str]) -> list[tuple[str, bytes]]:
    """(image_id, bytes) of the wanted images: every file's ids are read, then only the row groups
    holding a wanted image. Ingest hashes ids over its files, so statistics cannot skip a file, and
    reading every image's bytes would cost seconds per 10,000 images."""
    import pyarrow.compute as pc

    found = []
    for uri in storage.list_files(images_dir, ".parquet"):
        fs, path = storage.filesystem(uri)
        pf = pq.ParquetFile(path, filesystem=fs)
        hits = pc.is_in(pf.read(columns=["image_id"]).column("image_id"), value_set=pa.array(sorted(wanted)))
        rows = np.flatnonzero(hits.to_numpy(zero_copy_only=False))
        if not rows.size:
            continue
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        for group in sorted(set(np.searchsorted(ends, rows, side="right").tolist())):
            table = pf.read_row_group(group, columns=["image_id", "content"])
            found += [
                (i, c) for i, c in zip(table["image_id"].to_pylist(), table["content"].to_pylist()) if i in wanted
            ]
        if len(found) == len(wanted):
            break
    return found


def _neighbour_rows(pca, x: np.ndarray, images_dir: str | None) -> list[dict]:
    """A few query images (Test ones first, spread over labels) with their nearest neighbours."""
    rng = np.random.default_rng(0)
    pool = np.flatnonzero((pca["split"] == "Test").to_numpy()) if (pca["split"] == "Test").any() else np.arange(len(x))
    labels = pca["label"].to_numpy(object)
    queries: list[int] = []
    seen: set[object] = set()
    for i in rng.permutation(pool):
        if labels[i] not in seen or len(seen) >= len(set(labels)):
            queries.append(int(i))
            seen.add(labels[i])
        if len(queries) == min(QUERIES, len(x)):
            break
    n = min(QUERY_NEIGHBORS + 1, len(x))
    # A few queries against every image: one matrix product, no index worth building.
    squared = (x**2).sum(1)[None, :] - 2 * x[queries] @ x.T + (x[queries] ** 2).sum(1)[:, None]
    nearest = np.argpartition(squared, n - 1, axis=1)[:, :n]
    order = np.take_along_axis(squared, nearest, 1).argsort(1)
    indices = np.take_along_axis(nearest, order, 1)
    distances = np.sqrt(np.maximum(np.take_along_axis(squared, indices, 1), 0))
    wanted = {pca["image_id"].iloc[j] for row in indices for j in row}
    thumbs: dict[str, np.ndarray | None] = {}
    if images_dir and storage.exists(images_dir):
        for image_id, content in _contents(images_dir, wanted):
            try:
                thumbs[image_id] = draw.thumbnail(content)
            except Exception:  # noqa: BLE001 - a thumbnail that will not decode is drawn as a blank
                thumbs[image_id] = None
    rows = []
    for q, (dist, idx) in zip(queries, zip(distances, indices)):
        others = [(j, d) for j, d in zip(idx, dist) if j != q][:QUERY_NEIGHBORS]
        images = [(thumbs.get(pca["image_id"].iloc[q]), labels[q], 0.0)]
        images += [(thumbs.get(pca["image_id"].iloc[j]), labels[j], float(d)) for j, d in others]
        rows.append({"query": pca["image_id"].iloc[q], "images": images})
    return rows


def duplicates_section(folder: str | None, images_dir: str | None, out: str) -> list[str]:
    """The report's Duplicates section from the workdir's `m9 duplicates` output (folder): groups, images,
    groups crossing the Training/Test split per label, and thumbnails of the largest groups (also as a PNG);
    nothing when there is no such output."""
    from m9.neighbors import duplicates as dup

    if not folder:
        return []
    summary = storage.read_json(storage.join(folder, contract.DUPLICATES_SUMMARY))
    if summary is None:
        return []
    parts = ["<h2>Duplicates and Training/Test leakage (m9 duplicates)</h2>"]
    parts.append(
        _table(
            [
                ("images", summary["images"]),
                ("groups of duplicates", summary["groups"]),
                ("images in them", summary["images_in_groups"]),
                ("exact (same bytes)", summary["exact_images"]),
                ("near (cosine ≥ threshold)", summary["near_images"]),
                ("threshold", summary["threshold"]),
                ("groups crossing the Training/Test split", summary["crossing_groups"]),
                ("Test images leaked (in such a group)", summary["leaked_test_images"]),
                ("groups with more than one label", summary["groups_with_mixed_labels"]),
            ]
        )
    )
    by_label = summary["crossing_groups_by_label"]
    if by_label:
        parts.append("<h3>Groups crossing the split, per label</h3>")
        parts.append(_table(list(by_label.items()), ("label", "groups")))
    table = dup.read_output(folder)
    largest = [g["group"] for g in summary["largest_groups"]]
    if not largest:
        return parts + ["<p>No duplicates.</p>"]
    rows = [r for r in table.to_pylist() if r["group"] in largest]
    shown = {g: [r for r in rows if r["group"] == g][:8] for g in largest}
    per_row = max(len(members) for members in shown.values())
    thumbs: dict[str, np.ndarray | None] = {}
    if images_dir and storage.exists(images_dir):
        wanted = {r["image_id"] for members in shown.values() for r in members}
        for image_id, content in _contents(images_dir, wanted):
            try:
                thumbs[image_id] = draw.thumbnail(content)
            except Exception:  # noqa: BLE001 - a thumbnail that will not decode is drawn as a blank
                thumbs[image_id] = None
    figure_rows = [
        {
            "images": [
                (thumbs.get(r["image_id"]), f"{r['split']} {r['similarity']:.2f}", 0.0 if r["representative"] else 1.0)
                for r in members
            ]
        }
        for members in shown.values()
    ]
    png = draw.groups(figure_rows, per_row)
    storage.write_bytes_atomic(storage.join(out, contract.figure_name(contract.DUPLICATES_FIGURE)), png)
    parts.append("<h3>The largest groups</h3>")
    parts.append(
        "<p class=note>One row per group, its representative first (black frame); each image's split and "
        "cosine similarity to the representative.</p>"
    )
    parts.append(_img(png, "the largest groups of duplicates"))
    return parts


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1000px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}
.note{color:#666;font-size:.9em}
"""


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    def cell(v, tag="td"):
        numeric = isinstance(v, int | float) and not isinstance(v, bool)
        return f"<{tag}{' class=n' if numeric else ''}>{html.escape(str(v))}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows) + "</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def inputs(work: str) -> dict[str, str]:
    """The finished stage outputs the report of workdir `work` reads, by stage name: evaluate's output and
    the chain of manifests behind it (reduce, embed, ingest), reduce's chain when there is no evaluation of
    a reduce output, and the duplicates output made from the same embed output."""
    from m9.neighbors import duplicates

    found = lifecycle.upstream(storage.join(work, contract.EVALUATE.folder))
    if contract.REDUCE.name not in found:
        found = {**lifecycle.upstream(storage.join(work, contract.REDUCE.folder)), **found}
    embed_dir = found.get(contract.EMBED.name)
    duplicates_dir = duplicates.for_embed(embed_dir) if embed_dir else None
    if duplicates_dir:
        found[contract.DUPLICATES.name] = duplicates_dir
    return found


def page(workdir: str) -> str:
    """Where the report of workdir is (report/report.html)."""
    return storage.join(storage.normalize(workdir), contract.REPORT.folder, contract.REPORT_NAME)


def report(workdir: str, overwrite: bool = False) -> Manifest:
    """Write workdir/report/report.html (page()) and its figures as PNGs, and its manifest. A finished
    report of the same stage outputs and run record is reused; one of others is replaced."""
    work = storage.normalize(workdir)
    found = inputs(work)
    if contract.REDUCE.name not in found:
        raise InputError(f"{work} holds no finished `m9 reduce` output ({contract.REDUCE.folder}/); run `m9 run` first")
    out = storage.join(work, contract.REPORT.folder)
    storage.check_access(read=work, write=out)
    run = storage.read_json(storage.join(work, contract.RUN_RECORD))
    identity = "+".join(lifecycle.input_identity(found[name]) for name in sorted(found))
    print_ = lifecycle.fingerprint(REPORT, None, f"{identity}+run:{lifecycle.digest(run)}")
    with lease.hold(out, REPORT.name):
        # The report is a view of the workdir with no settings of its own: when the stage outputs or the
        # run record behind it changed, it is written again rather than refused.
        earlier = lifecycle.read_manifest(out)
        stale = False
        if earlier is not None and earlier.stage == REPORT.name and earlier.fingerprint != print_:
            stale = True
            log.info("report: %s (%s); writing it again", out, lifecycle.describe_change(earlier.fingerprint, print_))
        done = lifecycle.prepare(REPORT, out, print_, overwrite or stale)
        if done is not None:
            log.info("report: %s already holds the report of these outputs; skipping", out)
            return done
        started = time.perf_counter()
        figures = _write(work, found, run or {}, out)
        details = {"wall_s": round(time.perf_counter() - started, 2)}
        manifest = Manifest(
            stage=REPORT.name, input=work, fingerprint=print_, counts={"figures": figures}, details=details
        )
        return lifecycle.write_manifest(out, manifest)


def basis_text(basis: dict | None) -> str:
    """How reduce got its basis, as variance.json records it: fitted on these images, or kept from a fit."""
    if not basis:
        return "fitted on these images"
    if basis.get("kind") == "kept":
        return f"kept (--basis keep) from a fit on {basis['fitted_rows']} images at {basis['fitted_at']}"
    return f"fitted on these images ({basis['fitted_at']})"


def _write(work: str, found: dict[str, str], run: dict, out: str) -> int:
    """The page and its PNGs into out; returns how many figures it drew."""
    manifests: dict[str, Manifest] = {}
    for name, folder in found.items():
        manifest = lifecycle.read_manifest(folder)
        if manifest is not None:  # an output removed since inputs() found it is left out, as a missing one is
            manifests[name] = manifest
    reduce_dir = found[contract.REDUCE.name]
    embed_dir, images_dir = found.get(contract.EMBED.name), found.get(contract.INGEST.name)
    images_dir = images_dir if images_dir and storage.exists(images_dir) else None
    variance = storage.read_json(storage.join(reduce_dir, contract.VARIANCE_NAME))
    if variance is None:
        raise InputError(
            f"{reduce_dir} has no {contract.VARIANCE_NAME}, which `m9 reduce` writes before its manifest; "
            f"run `m9 reduce --overwrite` on it"
        )
    evaluate_dir = found.get(contract.EVALUATE.name)
    evaluation = storage.read_json(storage.join(evaluate_dir, contract.EVALUATE_NAME)) if evaluate_dir else None
    pca, x = read_pca(reduce_dir)
    storage.makedirs(out)

    figures: dict[str, tuple[bytes, str]] = {}
    figures[SCREE] = (draw.scree(variance), "explained variance per component and cumulative")
    sampled = len(pca) > SCATTER_MAX_POINTS
    shown = np.sort(np.random.default_rng(0).choice(len(pca), SCATTER_MAX_POINTS, replace=False)) if sampled else None
    if variance["k"] >= 2:
        labels = pca["label"].to_numpy(object)
        figures[SCATTER] = (
            draw.scatter(x[shown, :2] if sampled else x[:, :2], labels[shown] if sampled else labels, sampled),
            "PC1 x PC2 coloured by label",
        )
    figures[NEIGHBOURS] = (
        draw.neighbours(_neighbour_rows(pca, x, images_dir), QUERY_NEIGHBORS + 1),
        "nearest neighbours",
    )
    if evaluation:
        figures[EVALUATION] = (draw.evaluation(evaluation), "kNN accuracy and recall per label")
    for name, (png, _) in figures.items():
        storage.write_bytes_atomic(storage.join(out, contract.figure_name(name)), png)

    ingest, embed, reduce = (contract.INGEST.name, contract.EMBED.name, contract.REDUCE.name)
    ingest_c = manifests[ingest].counts if ingest in manifests else {}
    embed_c = manifests[embed].counts if embed in manifests else {}
    wall = dict(run.get("wall_s", {}))
    for name, m in manifests.items():  # stages run one by one: their manifests' own wall times
        if name not in wall and m.details.get("wall_s"):
            wall[name] = m.details["wall_s"]
    images_in = {ingest: ingest_c.get("files_found"), embed: embed_c.get("rows_in"), reduce: len(pca)}
    order = ["spark_startup", *contract.STAGES]  # run.json's keys come back sorted
    timing_rows = [
        (name, wall[name], f"{images_in[name] / wall[name]:.1f}" if images_in.get(name) and wall[name] else "")
        for name in sorted(wall, key=lambda n: order.index(n) if n in order else len(order))
    ]
    rejections = _rejections(embed_dir) if embed_dir else {}
    k_choice = variance.get("k_choice")
    reached = ", ".join(f"{t} at k={k}" for t, k in variance["smallest_k_reaching"].items() if k) or "none within k"
    host = run.get("machine") or {**machine(), "note": "of the machine writing this report (no run.json)"}

    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>m9 report: {html.escape(work)}</title><style>{_CSS}</style></head><body>",
        f"<h1>m9 report</h1><p class=note>{html.escape(work)}, written "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} by m9 {__version__}</p>",
        "<h2>Run summary</h2>",
        _table(
            [
                ("images found", ingest_c.get("files_found", "")),
                ("other files ignored", ingest_c.get("ignored_files", "")),
                ("hidden files ignored", ingest_c.get("hidden_files", "")),
                ("embedded", embed_c.get("embedded", "")),
                ("rejected", embed_c.get("rejected", "")),
                ("model", model_name(manifests[embed].details if embed in manifests else {}) or ""),
                ("model loads", embed_c.get("model_loads", "")),
                ("principal components kept", variance["k"]),
                ("variance explained", f"{100 * variance['total_explained']:.1f} %"),
                ("PCA basis", basis_text(variance.get("basis"))),
            ]
        ),
    ]
    if k_choice:
        parts.append(
            f"<p>k chosen by <code>--k {html.escape(k_choice['rule'])}</code>: {html.escape(k_choice['why'])}.</p>"
        )
    parts.append("<h3>Rejected images by reason</h3>")
    parts.append(_table(list(rejections.items()), ("reason", "images")) if rejections else "<p>None.</p>")
    parts.append("<h3>Timings</h3>")
    parts.append(
        _table(timing_rows, ("stage", "wall time (s)", "images/s"))
        if timing_rows
        else "<p class=note>No run.json: the stages were run one by one.</p>"
    )
    parts.append("<h3>Machine</h3>")
    parts.append(_table([(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in host.items()]))
    parts.append("<h2>Variance</h2>")
    parts.append(_img(figures[SCREE][0], figures[SCREE][1]))
    parts.append(f"<p class=note>Thresholds reached: {html.escape(reached)}.</p>")
    if SCATTER in figures:
        parts.append("<h2>PC1 x PC2</h2>")
        parts.append(_img(*figures[SCATTER]))
        note = (
            f"A random sample of {SCATTER_MAX_POINTS:,} of the {len(pca):,} images is drawn."
            if sampled
            else f"All {len(pca):,} images are drawn."
        )
        labels = pca["label"].nunique()
        if labels > draw.LEGEND_MAX_LABELS:
            note += f" {labels} labels: colours repeat and the legend is left out."
        parts.append(f"<p class=note>{note}</p>")
    parts.append("<h2>Nearest neighbours</h2>")
    parts.append(
        "<p class=note>Each row: a query image, then its 5 nearest neighbours in the PCA space "
        "(Euclidean distance: label); green frame = same label as the query, red = another.</p>"
    )
    parts.append(_img(*figures[NEIGHBOURS]))
    parts += duplicates_section(found.get(contract.DUPLICATES.name), images_dir, out)
    if evaluation:
        parts.append("<h2>Are the features any good? (m9 evaluate)</h2>")
        parts.append(
            f"<p>{evaluation['neighbors']}-nearest-neighbour classification of the label, "
            f"{html.escape(evaluation['protocol'])}, {evaluation['counts']['scored']} images scored.</p>"
        )
        parts.append(
            _table(
                [
                    (s, evaluation["dims"][s], f"{100 * evaluation['accuracy'][s]:.1f} %")
                    for s in contract.SPACES
                    if s in evaluation["accuracy"]
                ],
                ("space", "dimensions", "accuracy"),
            )
        )
        left_out = evaluation.get("raw_left_out", 0)
        if left_out:
            parts.append(
                f"<p class=note>{left_out} images left out of the raw-pixel baseline: they do not decode within "
                "--decode-memory, so that space is scored on the others.</p>"
            )
        parts.append(_img(*figures[EVALUATION]))
        space = contract.PCA_SPACE if contract.PCA_SPACE in evaluation["spaces"] else contract.FULL_SPACE
        pairs = evaluation["spaces"][space]["most_confused"]
        if pairs:
            parts.append(f"<h3>Most confused labels ({space})</h3>")
            parts.append(
                _table([(p["true"], p["predicted"], p["count"]) for p in pairs], ("true", "predicted", "images"))
            )
    parts.append("</body></html>")
    written = storage.join(out, contract.REPORT_NAME)
    storage.write_bytes_atomic(written, "\n".join(parts).encode())
    log.info("report: %s", written)
    return len(figures) + int(any(part.startswith("<h3>The largest groups") for part in parts))
