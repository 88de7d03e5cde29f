"""Measure `m9 run` on a changed image tree: how much of the first run's work the second one redoes.

Builds a Fashion-MNIST tree (`m9 data fashion-mnist`, --per-class images of each class in each of Training/
and Test/, so 20 × per-class images) and holds back some further images of the same set; runs
`m9 run --workdir W --store S` on it; changes the tree (--added held-back images added, --removed removed,
--renamed renamed, --copied copied under a second name, in their own class folders); runs the same command
again; then a fresh `m9 run --store none` on the changed tree into another workdir, the reference.

It reports the second run's embed and total times over the first's, the images the second run computed
(the truly new ones: a distinct sha256 the first tree did not have; none may be computed twice), and whether
the updated outputs equal the fresh ones: the same ingest rows as (relative_path, sha256), features within
1e-5, and the PCA coordinates equal up to each component's sign (a refit on the same rows; their order in the
files may differ, so the sums round differently). Writes a JSON and prints a markdown table with the date,
`lscpu`'s model name and the load.

Example: .venv/bin/python scripts/bench_updates.py --work /tmp/bench-updates --per-class 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

#: Stages `m9 run` times in run.json, in the order it runs them.
STAGES = ("spark_startup", "ingest", "embed", "reduce", "duplicates", "evaluate", "report")
#: The targets the second run is measured against: share of the first run's embed time and total time.
EMBED_TARGET, TOTAL_TARGET = 0.35, 0.6
#: Features of the updated and the fresh run may differ by this much (ONNX Runtime is deterministic per
#: image; batching may still change the last bits).
FEATURE_TOLERANCE = 1e-5


def m9(*args: str, log: Path) -> float:
    """Run `m9 ARGS` (this interpreter's m9), its output into log; returns its wall time in seconds."""
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-m", "m9.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"m9 {' '.join(args)} failed (exit {result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return round(wall, 2)


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_trees(work: Path, per_class: int, held: int, source: str | None) -> tuple[Path, list[Path]]:
    """work/tree: the first per_class images of each class and split of Fashion-MNIST; returns it and the
    held-back images (the next ones of each class and split, `held` in all) under work/pool."""
    pool, tree = work / "pool", work / "tree"
    extra = -(-held // 20)  # per class and split: 10 classes × 2 splits
    args = ["data", "fashion-mnist", "--output", str(pool), "--per-class", str(per_class + extra)]
    m9(*args, *(["--source", source] if source else []), log=work / "data.log")
    if tree.exists():
        shutil.rmtree(tree)
    back: list[Path] = []
    for folder in sorted({p.parent for p in images(pool)}):
        files = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem))
        target = tree / folder.relative_to(pool)
        target.mkdir(parents=True)
        for f in files[:per_class]:
            shutil.copy2(f, target / f.name)
        back += files[per_class:]
    return tree, random.Random(1).sample(back, held)


def change(tree: Path, held: list[Path], removed: int, renamed: int, copied: int, pool: Path) -> dict:
    """Change the tree in place: add the held-back images, remove, rename and copy some of its own."""
    rng = random.Random(0)
    chosen = rng.sample(images(tree), removed + renamed + copied)
    for p in chosen[:removed]:
        p.unlink()
    for p in chosen[removed : removed + renamed]:
        p.rename(p.with_name(f"{p.stem}-renamed.jpg"))
    for p in chosen[removed + renamed :]:
        shutil.copy2(p, p.with_name(f"{p.stem}-copy.jpg"))
    for p in held:
        shutil.copy2(p, tree / p.relative_to(pool))
    return {"added": len(held), "removed": removed, "renamed": renamed, "copied": copied}


def stage_walls(workdir: Path) -> dict:
    """run.json's wall time per stage, and each stage manifest's own wall_s."""
    record = json.loads((workdir / "run.json").read_text())
    walls = {name: record["wall_s"][name] for name in STAGES if name in record["wall_s"]}
    manifests = {}
    for folder in ("images", "embed", "reduce"):
        data = json.loads((workdir / folder / "_m9.json").read_text())
        manifests[folder] = {"wall_s": (data.get("details") or {}).get("wall_s"), "counts": data.get("counts", {})}
    return {"run_json": walls, "manifests": manifests}


def table(folder: Path, columns: list[str]):
    return pq.read_table(folder, columns=columns).to_pandas()


def pca_rows(workdir: Path) -> dict[tuple[str, str], bytes]:
    """(relative_path, sha256) → the image's pca row as bytes."""
    ids = table(workdir / "images", ["image_id", "relative_path", "sha256"]).set_index("image_id")
    pca = table(workdir / "reduce" / "pca", ["image_id", "pca"])
    rows = ids.loc[pca["image_id"]]
    return {
        (path, sha): np.asarray(v, np.float32).tobytes()
        for path, sha, v in zip(rows["relative_path"], rows["sha256"], pca["pca"], strict=True)
    }


def compare(updated: Path, fresh: Path, refit: bool) -> dict:
    """Whether the updated workdir's outputs equal the fresh one's (the PCA only when both refit: a kept
    basis is another basis than a fresh fit's)."""
    cols = ["image_id", "relative_path", "sha256"]
    a, b = table(updated / "images", cols), table(fresh / "images", cols)
    same_rows = set(zip(a["relative_path"], a["sha256"], strict=True)) == set(
        zip(b["relative_path"], b["sha256"], strict=True)
    )
    fa = table(updated / "embed" / "embeddings", ["image_id", "features"]).set_index("image_id").sort_index()
    fb = table(fresh / "embed" / "embeddings", ["image_id", "features"]).set_index("image_id").sort_index()
    same_ids = list(fa.index) == list(fb.index)
    feature_diff = (
        float(np.abs(np.stack(fa["features"].to_numpy()) - np.stack(fb["features"].to_numpy())).max())
        if same_ids and len(fa)
        else None
    )
    pa_ = table(updated / "reduce" / "pca", ["image_id", "pca"]).set_index("image_id").sort_index()
    pb = table(fresh / "reduce" / "pca", ["image_id", "pca"]).set_index("image_id").sort_index()
    pca_diff = pca_diff_signed = None
    if list(pa_.index) == list(pb.index) and len(pa_):
        x, y = np.stack(pa_["pca"].to_numpy()), np.stack(pb["pca"].to_numpy())
        if x.shape == y.shape:
            pca_diff = float(np.abs(x - y).max())
            signs = np.sign((x * y).sum(axis=0))
            pca_diff_signed = float(np.abs(x * signs - y).max() / np.abs(y).max())
    equal = bool(
        same_rows
        and same_ids
        and feature_diff is not None
        and feature_diff <= FEATURE_TOLERANCE
        and (not refit or (pca_diff_signed is not None and pca_diff_signed <= 1e-4))
    )
    return {
        "ingest_rows_equal": same_rows,
        "rows": [len(a), len(b)],
        "embed_ids_equal": same_ids,
        "features_max_abs_diff": feature_diff,
        "pca_max_abs_diff": pca_diff,
        "pca_max_diff_up_to_sign_relative": pca_diff_signed,
        "pca_compared": refit,
        "equal": equal,
    }


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/m9-bench-updates"), help="scratch folder")
    parser.add_argument("--per-class", type=int, default=200, help="images per class and split (20× in all)")
    parser.add_argument("--added", type=int, default=200)
    parser.add_argument("--removed", type=int, default=100)
    parser.add_argument("--renamed", type=int, default=50)
    parser.add_argument("--copied", type=int, default=50)
    parser.add_argument("--source", default=None, help="m9 data fashion-mnist's --source (a .deb or folder)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the result (default WORK/…)")
    parser.add_argument("run_options", nargs="*", help="more `m9 run` options, after --, e.g. -- --basis keep")
    args = parser.parse_args()
    work = args.work.resolve()
    for name in ("w", "w-fresh", "store"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    tree, held = build_trees(work, args.per_class, args.added, args.source)
    first_shas = {sha256(p) for p in images(tree)}
    run = ["run", "--input", str(tree), "--workdir", str(work / "w"), "--store", str(work / "store")]
    run += args.run_options
    loads = {"before_first": os.getloadavg()}
    first_wall = m9(*run, log=work / "run1.log")
    first = stage_walls(work / "w")
    first_pca = pca_rows(work / "w")
    changes = change(tree, held, args.removed, args.renamed, args.copied, work / "pool")
    second_shas = {sha256(p) for p in images(tree)}
    truly_new = len(second_shas - first_shas)
    loads["before_second"] = os.getloadavg()
    second_wall = m9(*run, log=work / "run2.log")
    second = stage_walls(work / "w")
    second_pca = pca_rows(work / "w")
    both = set(first_pca) & set(second_pca)  # the same relative path and bytes in both trees
    still = sum(first_pca[key] == second_pca[key] for key in both)
    loads["before_fresh"] = os.getloadavg()
    fresh_run = ["run", "--input", str(tree), "--workdir", str(work / "w-fresh"), "--store", "none"]
    fresh_wall = m9(*fresh_run, *args.run_options, log=work / "run-fresh.log")
    loads["after"] = os.getloadavg()

    embed1, embed2 = first["run_json"]["embed"], second["run_json"]["embed"]
    computed = second["manifests"]["embed"]["counts"].get("computed")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": {k: [round(x, 2) for x in v] for k, v in loads.items() if k != "after"},
        "command": " ".join(["m9", *run]),
        "images": {"first": len(first_shas), "second_files": len(images(tree)), "truly_new": truly_new},
        "changes": changes,
        "first": {"wall_s": first_wall, **first},
        "second": {"wall_s": second_wall, **second},
        "fresh": {"wall_s": fresh_wall, **stage_walls(work / "w-fresh")},
        "embed_ratio": round(embed2 / embed1, 3) if embed1 else None,
        "total_ratio": round(second_wall / first_wall, 3),
        "computed_second": computed,
        "computed_first": first["manifests"]["embed"]["counts"].get("computed"),
        "nothing_computed_twice": computed == truly_new,
        "unchanged_images": len(both),
        "unchanged_images_with_the_same_pca_bits": still,
        "outputs": compare(work / "w", work / "w-fresh", refit="keep" not in args.run_options),
    }
    out = args.json or work / "bench_updates.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    ok = {True: "yes", False: "**no**"}
    rows = [
        ("date", result["date"]),
        ("CPU", f"{result['cpu']} ({result['cpus']} CPUs)"),
        *(
            (f"load (1, 5, 15 min) {when.replace('_', ' ')} run", ", ".join(map(str, load)))
            for when, load in result["load_average"].items()
        ),
        ("images: first tree, changed tree, truly new", f"{len(first_shas)}, {len(images(tree))}, {truly_new}"),
        ("changes", ", ".join(f"{v} {k}" for k, v in changes.items())),
        ("first run (s): total, embed", f"{first_wall}, {embed1}"),
        ("second run (s): total, embed", f"{second_wall}, {embed2}"),
        (f"second / first embed (target ≤ {EMBED_TARGET})", result["embed_ratio"]),
        (f"second / first total (target ≤ {TOTAL_TARGET})", result["total_ratio"]),
        ("images computed: first, second run", f"{result['computed_first']}, {computed}"),
        ("second run computed only the truly new images", ok[result["nothing_computed_twice"]]),
        ("unchanged images whose pca row kept its bits (--basis keep: all)", f"{still} of {len(both)}"),
        ("fresh run --store none (s)", fresh_wall),
        ("ingest rows (relative_path, sha256) equal the fresh run's", ok[result["outputs"]["ingest_rows_equal"]]),
        ("features: max abs diff to the fresh run", result["outputs"]["features_max_abs_diff"]),
        (
            "pca: max diff up to sign, relative" + ("" if result["outputs"]["pca_compared"] else " (kept basis)"),
            result["outputs"]["pca_max_diff_up_to_sign_relative"],
        ),
        ("outputs equal the fresh run's", ok[result["outputs"]["equal"]]),
    ]
    print(f"`{result['command']}` (result in {out})\n")
    print("| | |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    runs = {name: result[name] for name in ("first", "second", "fresh")}
    print("\n| seconds (run.json) | " + " | ".join(runs) + " |\n| --- |" + " --- |" * len(runs))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(str(r["run_json"].get(stage, "")) for r in runs.values()) + " |")
    print("| m9 run (process) | " + " | ".join(str(r["wall_s"]) for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
