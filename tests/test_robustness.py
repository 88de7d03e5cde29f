"""Bad and odd inputs, --max-errors, resume after a killed driver, a killed actor, and clear workdir errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from m9.cli import main
from tests.conftest import SAMPLE, write_bad_images

# ----------------------------------------------------------------------------------------------------------
# The corpus: every file, and what m9 must do with it.
# ----------------------------------------------------------------------------------------------------------

#: Relative path → expected outcome: "embedded", "rejected: <reason start>", "ignored" (not an image
#: extension), "hidden" (a name starting with '.' or '_' somewhere in the path: Hadoop and Spark never list
#: those) or "unreadable: <reason start>" (counted by ingest, never read).
CORPUS = {
    "odd/truncated.jpg": "rejected: cannot decode: OSError: image file is truncated",
    "odd/zero-bytes.jpg": "rejected: empty file",
    "odd/text-named.jpg": "rejected: cannot decode: UnidentifiedImageError",
    "odd/rgba.png": "embedded",
    "odd/rgba-on-white.png": "embedded",
    "odd/palette-transparent.png": "embedded",
    "odd/grayscale.jpg": "embedded",
    "odd/cmyk.jpg": "embedded",
    "odd/sixteen-bit.png": "embedded",
    "odd/one-pixel.png": "embedded",
    "odd/huge-header.png": "rejected: too large",
    "odd/huge-header.jpg": "rejected: too large",
    "odd/bomb-1x-to-2x.png": "rejected: cannot decode: OSError: image file is truncated",
    "odd/exif-rotated.jpg": "embedded",
    "odd/rotated-by-hand.png": "embedded",
    "odd/UPPER.JPEG": "embedded",
    "Äpfel rot/grüne äpfel 1.jpg": "embedded",
    "Äpfel rot/a+b %20 (copy).png": "embedded",
    "Äpfel rot/100% 'natural'.jpg": "embedded",
    "odd/.hidden.jpg": "hidden",
    "odd/_underscore.jpg": "hidden",
    ".thumbnails/thumb.jpg": "hidden",
    "odd/picture.gif": "embedded",
    "odd/picture.tiff": "embedded",
    "odd/picture.webp": "embedded",
    "odd/picture.bmp": "embedded",
    "links/good-link.jpg": "embedded",
    "links/dangling.jpg": "unreadable: dangling symlink",
    "odd/notes.txt": "ignored",
    "odd/README": "ignored",
}


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height RGB pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) patched to declare width×height pixels."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            # SOF: marker(2) length(2) precision(1) height(2) width(2)
            return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]
    raise AssertionError("no SOF marker in the sample JPEG")


def write_corpus(root: Path) -> None:
    """Write every file of CORPUS under root (about 40 KB in all)."""
    photo_path = next(SAMPLE.glob("Training/*/*.jpg"))
    photo_bytes = photo_path.read_bytes()
    photo = Image.open(photo_path).convert("RGB")
    wide = photo.crop((0, 20, 100, 80))  # not square, so a missed rotation would change the embedding
    for rel in CORPUS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)

    def save(rel: str, im: Image.Image, **kw) -> None:
        im.save(root / rel, **kw)

    (root / "odd/truncated.jpg").write_bytes(photo_bytes[: len(photo_bytes) // 2])
    (root / "odd/zero-bytes.jpg").write_bytes(b"")
    (root / "odd/text-named.jpg").write_text("not a picture, just text with a .jpg name\n")
    rgba = photo.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(photo.size)
    rgba.putalpha(alpha)
    save("odd/rgba.png", rgba)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    save("odd/rgba-on-white.png", white.convert("RGB"))
    palette = photo.quantize(16)
    save("odd/palette-transparent.png", palette, transparency=0)
    save("odd/grayscale.jpg", photo.convert("L"), quality=90)
    save("odd/cmyk.jpg", photo.convert("CMYK"), quality=90)
    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("odd/sixteen-bit.png", Image.fromarray(grey16))
    save("odd/one-pixel.png", Image.new("RGB", (1, 1), (200, 30, 40)))
    (root / "odd/huge-header.png").write_bytes(_png_declaring(30_000, 30_000))
    (root / "odd/huge-header.jpg").write_bytes(_jpeg_declaring(photo_bytes, 60_000, 60_000))
    # Between Pillow's old bomb limit and twice it: within m9's --decode-memory, so decoded (and truncated).
    (root / "odd/bomb-1x-to-2x.png").write_bytes(_png_declaring(10_000, 10_000))
    # EXIF orientation 6 = "rotate 90° clockwise to display"; the hand-rotated PNG holds the displayed pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    wide.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    (root / "odd/exif-rotated.jpg").write_bytes(buf.getvalue())
    stored = Image.open(io.BytesIO(buf.getvalue()))
    stored.load()
    save("odd/rotated-by-hand.png", stored.transpose(Image.Transpose.ROTATE_270))
    save("odd/UPPER.JPEG", photo, quality=90)
    save("Äpfel rot/grüne äpfel 1.jpg", photo, quality=90)
    save("Äpfel rot/a+b %20 (copy).png", photo)
    save("Äpfel rot/100% 'natural'.jpg", photo, quality=80)
    for rel in ("odd/.hidden.jpg", "odd/_underscore.jpg", ".thumbnails/thumb.jpg"):
        (root / rel).write_bytes(photo_bytes)
    save("odd/picture.gif", photo)
    save("odd/picture.tiff", photo)
    save("odd/picture.webp", photo, quality=90)
    save("odd/picture.bmp", photo)
    os.symlink("../odd/UPPER.JPEG", root / "links/good-link.jpg")
    os.symlink("../odd/gone.jpg", root / "links/dangling.jpg")
    (root / "odd/notes.txt").write_text("notes\n")
    (root / "odd/README").write_text("readme\n")


def test_huge_images_are_rejected_without_decoding_them(tmp_path):
    """In a fresh process limited to 1 GB of address space: a 3.6 G-pixel JPEG header is rejected, not decoded,
    with a reason naming the option that would admit it."""
    write_corpus(tmp_path)
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from m9.model.decode import DecodeError, decode
for name in ("huge-header.png", "huge-header.jpg"):
    try:
        decode(open({str(tmp_path / "odd")!r} + "/" + name, "rb").read())
    except DecodeError as exc:
        assert str(exc).startswith("too large") and "--decode-memory" in str(exc), exc
    else:
        sys.exit(name + " was decoded")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (here, the large test process).
print(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 300 * 1024  # peak RSS in KiB: the interpreter, numpy and Pillow, no pixels


# ----------------------------------------------------------------------------------------------------------
# The corpus through `m9 run --max-errors`: every file embedded, rejected with a reason, or ignored.
# ----------------------------------------------------------------------------------------------------------

#: --max-errors for the corpus run: the corpus has more rejections than this, so the run must fail.
CORPUS_MAX_ERRORS = 3


def _table(folder: Path):
    return pq.read_table(str(folder)).to_pandas()


def _features(folder: Path):
    """(ids, paths, features, errors frame) of an embed output, sorted by image_id."""
    emb = _table(folder / "embeddings").sort_values("image_id").reset_index(drop=True)
    errors = _table(folder / "errors").sort_values("image_id").reset_index(drop=True)
    return emb, np.stack(emb["features"].to_numpy()).astype(np.float32), errors


def _assert_same_output(got: Path, want: Path) -> None:
    """Every image exactly once, and the same features (to 1e-5) and errors as the uninterrupted run."""
    emb, features, errors = _features(got)
    ref_emb, ref_features, ref_errors = _features(want)
    assert emb["image_id"].is_unique and errors["image_id"].is_unique
    assert set(emb["image_id"]).isdisjoint(errors["image_id"])
    assert list(emb["image_id"]) == list(ref_emb["image_id"])
    assert np.abs(features - ref_features).max() <= 1e-5
    assert errors[["image_id", "error"]].equals(ref_errors[["image_id", "error"]])


@pytest.fixture(scope="module")
def corpus_run(spark, ray_local, weights_path, tmp_path_factory) -> dict:
    """`m9 run --max-errors 3` on the corpus, once: its CLI result and folders."""
    # A space and Hadoop's glob characters in the input and work folders themselves: Spark must read them as
    # names, not patterns (`[2024]` would match a folder named `2`, `0` or `4`; `{a,b}` one named a or b).
    root = tmp_path_factory.mktemp("corpus") / "my photos [2024] {a,b} *?"
    write_corpus(root)
    work = tmp_path_factory.mktemp("corpus-work") / "run [1] {x}"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--input",
            str(root),
            "--workdir",
            str(work),
            "--actors",
            "1",
            "--batch-size",
            "4",
            "--k",
            "3",
            "--weights",
            str(weights_path),
            "--max-errors",
            str(CORPUS_MAX_ERRORS),
        ],
    )
    return {"root": root, "work": work, "result": result}


@pytest.mark.slow
def test_every_corpus_file_has_its_expected_outcome(corpus_run):
    root, work = corpus_run["root"], corpus_run["work"]
    entries = (p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    assert sorted(p.relative_to(root).as_posix() for p in entries) == sorted(CORPUS)
    embedded = _table(work / "embed" / "embeddings")
    errors = _table(work / "embed" / "errors")
    outcome = {Path(p).relative_to(root).as_posix(): "embedded" for p in embedded["path"]}
    outcome.update(
        {Path(p).relative_to(root).as_posix(): f"rejected: {e}" for p, e in zip(errors["path"], errors["error"])}
    )
    manifest = json.loads((work / "images" / "_m9.json").read_text())["counts"]
    for rel, expected in CORPUS.items():
        if expected in ("hidden", "ignored") or expected.startswith("unreadable"):
            assert rel not in outcome, rel
        else:
            assert outcome[rel].startswith(expected), (rel, outcome[rel])
    # Counts reconcile: every file is embedded, rejected, ignored or hidden, and counted as such.
    want = {
        kind: sum(1 for v in CORPUS.values() if v.split(":")[0] == kind)
        for kind in ("embedded", "rejected", "ignored", "hidden", "unreadable")
    }
    assert want == {"embedded": 18, "rejected": 6, "ignored": 2, "hidden": 3, "unreadable": 1}
    assert manifest["files_found"] == len(outcome) == want["embedded"] + want["rejected"]
    assert manifest["ignored_files"] == want["ignored"] and manifest["hidden_files"] == want["hidden"]
    assert manifest["unreadable_files"] == want["unreadable"] and manifest["entries"] == len(CORPUS)
    assert len(embedded) == want["embedded"] and len(errors) == want["rejected"]
    assert embedded["image_id"].is_unique and set(embedded["image_id"]).isdisjoint(errors["image_id"])
    labels = dict(zip(embedded["path"].map(lambda p: Path(p).name), embedded["label"]))
    assert labels["grüne äpfel 1.jpg"] == labels["a+b %20 (copy).png"] == labels["100% 'natural'.jpg"] == "Äpfel rot"
    pca = _table(work / "reduce" / "pca")
    assert sorted(pca["image_id"]) == sorted(embedded["image_id"])


@pytest.mark.slow
def test_exif_rotation_and_alpha_are_applied(corpus_run):
    embedded = _table(corpus_run["work"] / "embed" / "embeddings")
    features = {Path(p).name: np.asarray(f, np.float32) for p, f in zip(embedded["path"], embedded["features"])}
    assert np.abs(features["exif-rotated.jpg"] - features["rotated-by-hand.png"]).max() <= 1e-5
    assert np.abs(features["rgba.png"] - features["rgba-on-white.png"]).max() <= 1e-5
    assert all(np.isfinite(f).all() and f.std() > 0.01 for f in features.values())


@pytest.mark.slow
def test_too_many_rejections_fail_the_run_after_writing_everything(corpus_run):
    result, work = corpus_run["result"], corpus_run["work"]
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "  rejected          6  (reasons in " in result.output
    found = "  images found      24 (2 other files and 3 hidden files ignored, 1 unreadable: 1 dangling symlink)"
    assert found in lines
    assert lines[-1] == (
        f"Error: 6 of 24 images were rejected (more than --max-errors {CORPUS_MAX_ERRORS}); "
        f"reasons in {work / 'embed' / 'errors'}"
    )
    assert [ln for ln in lines if ln.startswith("Error:")] == lines[-1:]
    for stage in ("images", "embed", "reduce"):  # everything was written, each stage marked finished
        assert (work / stage / "_m9.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("max_errors", "exit_code"), [("6", 0), ("5", 1), ("0.25", 0), ("0.2", 1), ("1.5", 2)])
def test_max_errors_counts_and_fractions(corpus_run, max_errors, exit_code):
    """A re-run on the finished output is skipped, yet still says whether the rejections are too many."""
    work = corpus_run["work"]
    result = CliRunner().invoke(
        main, ["embed", "--input", str(work / "images"), "--output", str(work / "embed"), "--max-errors", max_errors]
    )
    assert result.exit_code == exit_code, result.output
    if exit_code == 0:
        assert result.output.startswith("embed: 18 embedded, 6 rejected (of 24)")
    elif exit_code == 1:  # the summary first, then the one error line
        assert result.output.startswith("embed: 18 embedded, 6 rejected (of 24)")
        assert result.output.splitlines()[-1].startswith(
            f"Error: 6 of 24 images were rejected (more than --max-errors {max_errors})"
        )
    else:
        assert "expected a count like 10 or a fraction like 0.05" in result.output


# ----------------------------------------------------------------------------------------------------------
# Resume and exactly-once: a SIGKILLed driver, a SIGKILLed actor.
# ----------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def many(spark, tmp_path_factory) -> dict:
    """The bundled sample plus 3 broken files: 243 images in about 10 shards."""
    from m9.config import IngestConfig
    from m9.stages.ingest import ingest

    root = tmp_path_factory.mktemp("many")
    shutil.copytree(SAMPLE, root / "fruit and nuts")
    write_bad_images(root / "fruit and nuts" / "broken")
    images = tmp_path_factory.mktemp("many-work") / "images"
    ingest(IngestConfig(input=str(root), output=str(images), images_per_file=25))
    shards = sorted(p.name for p in images.glob("part-*.parquet"))
    assert len(shards) >= 8
    return {"images": images, "shards": shards}


@pytest.fixture(scope="module")
def reference(many, ray_local, weights_path, tmp_path_factory) -> Path:
    """An uninterrupted embed of `many`."""
    from m9.config import EmbedConfig
    from m9.stages.embed import embed

    out = tmp_path_factory.mktemp("reference") / "embed"
    cfg = EmbedConfig(input=str(many["images"]), output=str(out), actors=1, batch_size=8, weights=str(weights_path))
    counts = embed(cfg).counts
    assert (counts["embedded"], counts["rejected"], counts["rows_in"]) == (240, 3, 243)
    return out


def _processes_with_env(marker: str) -> list[int]:
    """PIDs of this user's processes whose environment holds marker (e.g. RAY_TMPDIR=/tmp/m9ray-x)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_uninterrupted_output(many, reference, weights_path, tmp_path):
    # The run's own Ray temp folder marks every process its driver starts (raylet, GCS, workers), so the
    # test can find and end exactly those; short, because Ray's socket paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="m9ray-", dir="/tmp")
    marker = f"RAY_TMPDIR={ray_tmp}"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    out = tmp_path / "embed"
    cmd = [
        sys.executable,
        "-m",
        "m9.cli",
        "embed",
        "--input",
        str(many["images"]),
        "--output",
        str(out),
        "--actors",
        "1",
        "--batch-size",
        "8",
        "--weights",
        str(weights_path),
    ]
    try:
        with open(tmp_path / "killed.log", "wb") as log:
            driver = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
            deadline = time.monotonic() + 300
            while not list((out / "embeddings").glob("*.parquet")):
                assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard committed in time"
                time.sleep(0.05)
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        # Ray's own processes share the driver's fate (they die with it); end any that did not.
        time.sleep(1)
        leftovers = _processes_with_env(marker)
        print(f"Ray processes left by the killed driver: {[_title(p)[:60] for p in leftovers]}")
        _kill_all(leftovers)

        committed = sorted(p.name for p in (out / "embeddings").glob("*.parquet"))
        assert 1 <= len(committed) < len(many["shards"]), committed
        assert not (out / "_m9.json").exists()
        for name in committed:  # whatever is visible as finished is whole: every row of its shard
            rows = pq.ParquetFile(many["images"] / name).metadata.num_rows
            assert len(_table(out / "embeddings" / name)) + len(_table(out / "errors" / name)) == rows
        # Temporary files a run killed mid-write would leave (the kill rarely lands there, so plant them).
        pending = sorted(set(many["shards"]) - set(committed))[0]
        (out / "embeddings" / f"{pending}.tmp-0123abcd").write_bytes(b"PAR1 half a file")
        (out / "errors" / f"{pending}.tmp-0123abcd").write_bytes(b"")

        again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.startswith("embed: 240 embedded, 3 rejected (of 243)")
    finally:
        _kill_all(_processes_with_env(marker))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    manifest = json.loads((out / "_m9.json").read_text())["counts"]
    assert manifest["shards_skipped"] == len(committed)
    assert not [p.name for p in out.rglob("*.tmp-*")]
    _assert_same_output(out, reference)


def _children(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(proc.name))
    return kids


def _title(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_every_image_lands_once(
    many, reference, ray_local, weights_path, tmp_path, monkeypatch
):
    import ray

    from m9.config import EmbedConfig
    from m9.stages import embed as embed_stage

    # The suite's own raylet: its children are this cluster's workers, not another session's.
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = tmp_path / "embed"
    killed: list[int] = []
    commit = embed_stage._ShardWriter._commit

    def commit_then_kill_an_actor(writer, shard: str) -> None:
        """The kill happens inside the driver's own loop, right after the first shard is committed: the
        driver takes no more rows until it is done, so all other shards are still to come (about 9 of 10,
        seconds of work for both actors), whatever the machine's speed. A watcher thread polling for the
        first file raced the run's end instead."""
        commit(writer, shard)
        if killed:
            return
        actors = [p for p in _children(raylet) if _title(p).startswith("ray::EmbedActor")]
        assert actors, "no embed actor under the suite's raylet"
        os.kill(actors[0], signal.SIGKILL)
        killed.append(actors[0])

    monkeypatch.setattr(embed_stage._ShardWriter, "_commit", commit_then_kill_an_actor)
    result = embed_stage.embed(
        EmbedConfig(input=str(many["images"]), output=str(out), actors=2, batch_size=8, weights=str(weights_path))
    )
    assert len(killed) == 1
    counts = result.counts
    assert (counts["embedded"], counts["rejected"], counts["rows_in"]) == (240, 3, 243)
    assert counts["model_loads"] >= 3  # the replacement actor loaded the model again
    _assert_same_output(out, reference)


def _kill_after_first_commit(monkeypatch, raylet: int, how_many: int) -> list[int]:
    """Right after the first shard is committed (the driver's own loop: all other shards are still to come),
    SIGKILL `how_many` of this cluster's embed actors. Returns the pids killed, filled in when it happens."""
    from m9.stages import embed as embed_stage

    killed: list[int] = []
    commit = embed_stage._ShardWriter._commit

    def commit_then_kill(writer, shard: str) -> None:
        commit(writer, shard)
        if killed:
            return
        actors = [p for p in _children(raylet) if _title(p).startswith("ray::EmbedActor")]
        assert len(actors) >= how_many, "not enough embed actors under the suite's raylet"
        for pid in actors[:how_many]:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(embed_stage._ShardWriter, "_commit", commit_then_kill)
    return killed


@pytest.mark.slow
def test_an_actor_ray_cannot_restart_leaves_its_work_to_the_others(
    many, reference, ray_local, weights_path, tmp_path, monkeypatch
):
    import ray

    from m9.config import EmbedConfig
    from m9.stages import embed as embed_stage

    monkeypatch.setattr(embed_stage, "ACTOR_RESTARTS", 0)  # a killed actor is gone for good
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed = _kill_after_first_commit(monkeypatch, raylet, 1)
    out = tmp_path / "embed"
    result = embed_stage.embed(
        EmbedConfig(input=str(many["images"]), output=str(out), actors=2, batch_size=8, weights=str(weights_path))
    )
    assert len(killed) == 1
    counts = result.counts
    assert (counts["embedded"], counts["rejected"], counts["rows_in"]) == (240, 3, 243)
    assert counts["model_loads"] == 2  # no replacement: the other actor did the dead one's items
    _assert_same_output(out, reference)


@pytest.mark.slow
def test_with_every_actor_gone_embed_stops_with_one_line_and_resumes(
    many, reference, ray_local, weights_path, tmp_path, monkeypatch
):
    import ray

    from m9.config import EmbedConfig
    from m9.errors import EngineError
    from m9.stages import embed as embed_stage

    monkeypatch.setattr(embed_stage, "ACTOR_RESTARTS", 0)
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed = _kill_after_first_commit(monkeypatch, raylet, 2)
    out = tmp_path / "embed"
    cfg = EmbedConfig(input=str(many["images"]), output=str(out), actors=2, batch_size=8, weights=str(weights_path))
    with pytest.raises(EngineError, match=r"^every embed actor died \(last on a work item of part-") as err:
        embed_stage.embed(cfg)
    assert len(killed) == 2 and "\n" not in str(err.value)
    monkeypatch.undo()  # restarts and the real commit again: the same command finishes the output
    counts = embed_stage.embed(cfg).counts
    assert (counts["embedded"], counts["rejected"]) == (240, 3)
    # What was committed before the actors died is kept: the first shard, and any other already complete.
    assert 1 <= counts["shards_skipped"] < len(many["shards"])
    _assert_same_output(out, reference)


# ----------------------------------------------------------------------------------------------------------
# A workdir holding something else: one clear line, and nothing already written is touched.
# ----------------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_incompatible_outputs_are_clear_errors_and_stay_untouched(corpus_run, many, tmp_path):
    work, corpus = corpus_run["work"], corpus_run["root"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"someone's file")
    # An interrupted embed of the corpus (its embeddings, no manifest), then pointed at another input.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(work / "embed" / "embeddings", unfinished / "embeddings")
    cases = [
        (
            ["run", "--input", str(SAMPLE), "--workdir", str(work)],
            # Another tree, not the same one grown: refused (an update is for the same source).
            f"{work / 'images'} already holds a finished `m9 ingest` output made differently (the input changed, "
            f"source ",
        ),
        (
            ["embed", "--input", str(work / "images"), "--output", str(work / "images")],
            f"{work / 'images'} holds the output of `m9 ingest` on {corpus}",
        ),
        (
            ["ingest", "--input", str(corpus), "--output", str(foreign)],
            f"{foreign} already holds files m9 did not write (e.g. holiday.jpg); choose another output folder or "
            f"pass --overwrite to replace it",
        ),
        (["embed", "--input", str(many["images"]), "--output", str(unfinished)], f"{unfinished} holds embeddings of "),
    ]
    before = {folder: _snapshot(folder) for folder in (work, foreign, unfinished)}
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert isinstance(result.exception, SystemExit), result.exception  # no traceback
        lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), (args, result.output)
        assert "Traceback" not in result.output
    assert "pass --overwrite to replace it" in lines[0] and "not in" in lines[0]
    assert {folder: _snapshot(folder) for folder in before} == before
    # The fix the message names works: --overwrite replaces the folder's contents.
    result = CliRunner().invoke(main, ["ingest", "--input", str(corpus), "--output", str(foreign), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (foreign / "holiday.jpg").exists() and (foreign / "_m9.json").exists()


def test_rows_delivered_twice_are_written_once(tmp_path):
    """A retried task may send rows the driver already has; the shard still commits each image once."""
    from m9.config import FEATURE_DIM
    from m9.stages.embed import _ShardWriter

    def batch(ids):
        n = len(ids)
        return {
            "image_id": np.array(ids, dtype=object),
            "path": np.array([f"/x/{i}.jpg" for i in ids], object),
            "label": np.array(["x"] * n, object),
            "split": np.array([None] * n, object),
            "features": np.ones((n, FEATURE_DIM), np.float32),
            "error": np.array(["" if i != "c" else "empty file" for i in ids], object),
        }

    writer = _ShardWriter(str(tmp_path), {"/in/part-0.parquet": 3})
    writer.add("/in/part-0.parquet", batch(["a", "b"]), np.arange(2))
    writer.add("/in/part-0.parquet", batch(["b", "c"]), np.arange(2))  # "b" again, from a retried task
    writer.add("/in/part-0.parquet", batch(["a"]), np.arange(1))  # after the commit
    assert writer.duplicates == 2 and not writer.rows
    assert sorted(_table(tmp_path / "embeddings")["image_id"]) == ["a", "b"]
    assert list(_table(tmp_path / "errors")["image_id"]) == ["c"]
