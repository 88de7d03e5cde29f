"""Measure m9's neighbour tools and write the numbers into docs/ (docs/neighbors.md quotes them).

  threshold: plant one modified copy of every image of a real set (Fashion-MNIST, photographs, the sample),
             embed everything with m9, and give near-duplicate precision and recall per threshold, recall per
             modification, and how often the original is a copy's nearest image (what `m9 search` returns).
  million:   1,000,000 vectors (real features plus small noise) with planted near copies: index build time and
             peak memory, query latency p50/p99, recall@10 against exact search, `m9 duplicates`'s search.

Example: .venv/bin/python scripts/bench_neighbors.py threshold --data /tmp/nb-data --work /tmp/nb-thr
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from m9.neighbors import duplicates as dup
from m9.neighbors import features, planted
from m9.neighbors import index as m9index

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_neighbors")
THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def threshold(args) -> dict:
    from m9.config import EmbedConfig, IngestConfig
    from m9.stages.embed import embed
    from m9.stages.ingest import ingest
    from m9.stages.pipeline import sample_dir

    work = Path(args.work)
    tree = work / "tree"
    if not tree.exists():
        sets = {"fashion-mnist": Path(args.data) / "fm", "sample": Path(sample_dir())}
        for name, src in sets.items():
            for split in ("Training", "Test"):
                for label_dir in (src / split).iterdir():
                    shutil.copytree(label_dir, tree / split / f"{name}.{label_dir.name}", dirs_exist_ok=True)
        for photo in _images(Path(args.data) / "photos-src"):
            (tree / "Training" / "photos.photo").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, tree / "Training" / "photos.photo" / photo.name)
        originals = _images(tree)
        made = planted.plant(originals, tree, tree)
        (work / "planted.json").write_text(json.dumps(made))
    made = json.loads((work / "planted.json").read_text())
    images, embedded = str(work / "images"), str(work / "embed")
    ingest(IngestConfig(input=str(tree), output=images))
    embed(EmbedConfig(input=images, output=embedded, actors=2))
    meta, x = features.read(embedded)
    paths = meta.column("path").to_pylist()
    row = {p: i for i, p in enumerate(paths)}
    pairs = {(row[m["original"]], row[m["copy"]]): m["kind"] for m in made if m["original"] in row and m["copy"] in row}
    dataset = np.array([Path(p).parent.name.split(".")[0] for p in paths])
    i, j, s = dup.near_pairs(x, min(THRESHOLDS))
    copy_rows = {c for _, c in pairs}
    result = {"machine": machine(), "images": len(x), "planted": len(pairs), "thresholds": []}
    for t in THRESHOLDS:
        keep = s >= t
        found = {(int(a), int(b)) for a, b in zip(i[keep], j[keep])}
        hits = sum((a, b) in found or (b, a) in found for a, b in pairs)
        by = {}
        for name in sorted(set(dataset)):
            mine = {p for p in pairs if dataset[p[0]] == name}
            got = {f for f in found if dataset[f[0]] == name and dataset[f[1]] == name}
            tp = sum((a, b) in got or (b, a) in got for a, b in mine)
            by[name] = {
                "precision": tp / len(got) if got else 1.0,
                "recall": tp / len(mine) if mine else 1.0,
                "pairs_found": len(got),
            }
        kinds = {}
        for kind in planted.NEAR:
            mine = [p for p, k in pairs.items() if k == kind]
            kinds[kind] = sum((a, b) in found or (b, a) in found for a, b in mine) / len(mine)
        result["thresholds"].append(
            {
                "threshold": t,
                "precision": hits / len(found) if found else 1.0,
                "recall": hits / len(pairs),
                "pairs_found": len(found),
                "by_set": by,
                "recall_by_modification": kinds,
            }
        )
    # Search: each copy as the query against an index of the originals only; is its original first?
    base = np.array([r not in copy_rows for r in range(len(x))])
    base_rows = np.flatnonzero(base)
    idx = m9index.build(x[base], "exact")
    copies = [(a, b) for a, b in pairs]
    _, top = m9index.search(idx, x[[b for _, b in copies]], 1)
    first = base_rows[top[:, 0]] == np.array([a for a, _ in copies])
    result["search_original_first"] = float(first.mean())
    result["search_original_first_by_set"] = {
        name: float(first[[dataset[a] == name for a, _ in copies]].mean()) for name in sorted(set(dataset))
    }
    # The query path of `m9 search --image` gives the features embed stored for the same file.
    from m9.neighbors.search import embed_image

    probe = [b for _, b in copies[:: max(1, len(copies) // 20)]]
    diffs = [float(np.abs(embed_image(paths[b], embedded)[0] - x[b]).max()) for b in probe]
    result["search_query_vs_embed_max_abs_diff"] = max(diffs)
    return result


def million(args) -> dict:
    """1,000,000 unit vectors made from real features: each a real image's features plus Gaussian noise of
    relative size args.noise, with every 100th a near copy (noise args.copy_noise) of another vector."""
    import faiss

    meta, real = features.read(features.locate(args.features).embed)
    rng = np.random.default_rng(0)
    n, d = args.n, real.shape[1]
    log.info("million: %d vectors from %d real features", n, len(real))
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        src = real[rng.integers(0, len(real), stop - start)]
        noise = rng.standard_normal((stop - start, d), dtype=np.float32) * (args.noise / np.sqrt(d))
        x[start:stop] = src + noise
    features.normalize(x)
    copies = np.arange(0, n, 100)[1:]
    sources = rng.integers(0, n, len(copies))
    sources = np.where(sources == copies, (sources + 1) % n, sources)
    x[copies] = x[sources] + rng.standard_normal((len(copies), d), dtype=np.float32) * (args.copy_noise / np.sqrt(d))
    x[copies] /= np.linalg.norm(x[copies], axis=1, keepdims=True)
    result = {
        "machine": machine(),
        "n": n,
        "dim": d,
        "real_features": len(real),
        "noise": args.noise,
        "copy_noise": args.copy_noise,
    }
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["vectors_gb"] = round(x.nbytes / 1e9, 2)

    queries = x[rng.choice(n, args.queries, replace=False)]
    started = time.perf_counter()
    _, truth = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a second copy of x
    result["exact_search_s_per_query_batched"] = round((time.perf_counter() - started) / args.queries, 4)
    lat = []
    for q in queries[:50]:
        t = time.perf_counter()
        faiss.knn(q[None], x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        lat.append(time.perf_counter() - t)
    result["exact_p50_ms"], result["exact_p99_ms"] = (round(1000 * float(np.percentile(lat, p)), 2) for p in (50, 99))
    log.info("million: exact search p50 %.1f ms", result["exact_p50_ms"])

    started = time.perf_counter()
    idx = m9index.build(x, "ivf")
    result["ivf_build_s"] = round(time.perf_counter() - started, 1)
    result["cells"] = int(faiss.downcast_index(idx).nlist)
    result["peak_rss_gb_after_build"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    result["rss_before_gb"] = round(rss0 / 1024, 2)
    result["nprobe"] = {}
    for nprobe in (8, 16, 32, 64):
        _, got = m9index.search(idx, queries, 10, nprobe)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
        lat = []
        for q in queries[:500]:
            t = time.perf_counter()
            m9index.search(idx, q[None], 10, nprobe)
            lat.append(time.perf_counter() - t)
        result["nprobe"][nprobe] = {
            "recall_at_10": round(recall, 4),
            "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        }
        log.info("million: nprobe %d recall@10 %.3f p99 %.1f ms", nprobe, recall, result["nprobe"][nprobe]["p99_ms"])
    started = time.perf_counter()
    extra = x[:10000].copy()
    m9index.add(idx, extra, np.arange(n, n + len(extra), dtype=np.int64))
    result["add_10000_s"] = round(time.perf_counter() - started, 2)
    del idx

    started = time.perf_counter()
    i, j, s = dup.near_pairs(x, args.threshold)
    result["duplicates_search_s"] = round(time.perf_counter() - started, 1)
    found = {(int(a), int(b)) for a, b in zip(i, j)}
    planted_pairs = {(int(min(a, b)), int(max(a, b))) for a, b in zip(copies, sources)}
    hit = len(found & planted_pairs)
    result["duplicates"] = {
        "threshold": args.threshold,
        "pairs_found": len(found),
        "planted": len(planted_pairs),
        "planted_found": hit,
        "recall": round(hit / len(planted_pairs), 4),
        "precision": round(hit / max(1, len(found)), 4),
    }
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    return result


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("threshold")
    t.add_argument(
        "--data", required=True, help="folder with fm/ (m9 data fashion-mnist) and photos-src/ (m9 data photos)"
    )
    t.add_argument("--work", required=True)
    t.add_argument("--out", default=str(REPO / "docs" / "neighbors-threshold.json"))
    m = sub.add_parser("million")
    m.add_argument("--features", required=True, help="a workdir or embed output whose features seed the vectors")
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--noise", type=float, default=0.5, help="noise norm relative to a unit vector")
    m.add_argument("--copy-noise", type=float, default=0.2)
    m.add_argument("--threshold", type=float, default=dup.DEFAULT_THRESHOLD)
    m.add_argument("--queries", type=int, default=1000)
    m.add_argument("--out", default=str(REPO / "docs" / "neighbors-million.json"))
    args = parser.parse_args()
    result = threshold(args) if args.what == "threshold" else million(args)
    result["command"] = "python scripts/bench_neighbors.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
