"""The stage contracts and the output lease: staleness, resume and one writer per output (no engines)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m9.config import EmbedConfig, IngestConfig, ReduceConfig
from m9.errors import InputError
from m9.io import lease
from m9.stages import contract, lifecycle
from m9.stages.contract import EMBED, INGEST, REDUCE
from m9.stages.lifecycle import Manifest
from tests.conftest import moto_server, point_aws_at

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("stage", "cfg_type"), [(INGEST, IngestConfig), (EMBED, EmbedConfig), (REDUCE, ReduceConfig)])
def test_every_config_field_is_classified(stage, cfg_type):
    """A new option must say whether it changes the stage's output (and so belongs in its fingerprint)."""
    assert lifecycle.unclassified_fields(stage, cfg_type) == []


def test_configs_take_keywords_only():
    with pytest.raises(TypeError):
        IngestConfig("in", "out")  # positional: the point of the test


def test_manifest_round_trip_and_old_manifests():
    m = Manifest(stage="reduce", input="/x", fingerprint={"k": 5}, counts={"rows": 3}, details={"k": 5})
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    old = Manifest.from_json({"stage": "reduce", "input": "/x", "counts": {"rows": 3}, "k": 50, "m9_version": "0.1.0"})
    assert old.fingerprint == {} and old.details == {"k": 50}


def test_manifests_name_a_sibling_input_relative_to_themselves(tmp_path):
    """A moved or copied workdir finds its stages' outputs: `../embed`, resolved against the manifest."""
    assert lifecycle.stored_input(str(tmp_path / "w/reduce"), str(tmp_path / "w/embed")) == "../embed"
    assert lifecycle.stored_input("s3://b/runs/w/reduce", "s3://b/runs/w/embed") == "../embed"
    assert lifecycle.stored_input("s3://b/w/reduce", "s3://other/w/embed") == "s3://other/w/embed"
    assert lifecycle.stored_input(str(tmp_path / "w/reduce"), "/elsewhere/embed") == "/elsewhere/embed"
    assert lifecycle.resolve_input(str(tmp_path / "moved/reduce"), "../embed") == str(tmp_path / "moved/embed")
    assert lifecycle.resolve_input("s3://b/moved/reduce", "../embed") == "s3://b/moved/embed"
    assert lifecycle.resolve_input(str(tmp_path / "moved/reduce"), "/old/w/embed") == "/old/w/embed"  # as written
    assert lifecycle.resolve_input("s3://b/moved/reduce", "s3://b/w/embed") == "s3://b/w/embed"

    work = tmp_path / "w"
    (work / "reduce").mkdir(parents=True)
    written = Manifest(stage="reduce", input=str(work / "embed"), fingerprint={"k": 5}, counts={})
    lifecycle.write_manifest(str(work / "reduce"), written)
    assert json.loads((work / "reduce" / contract.MANIFEST).read_text())["input"] == "../embed"
    (work / "images").mkdir()
    lifecycle.write_manifest(str(work / "images"), Manifest(stage="ingest", input="/photos", fingerprint={}, counts={}))
    assert json.loads((work / "images" / contract.MANIFEST).read_text())["input"] == "/photos"  # an image tree
    moved = tmp_path / "moved"
    work.rename(moved)
    assert lifecycle.read_manifest(str(moved / "reduce")).input == str(moved / "embed")
    # An earlier m9's absolute input, moved since: the chain finds the folder of that name beside it.
    (moved / "embed").mkdir()
    old = {"stage": "embed", "input": str(work / "images"), "fingerprint": {}, "counts": {}}
    (moved / "embed" / contract.MANIFEST).write_text(json.dumps(old))
    assert lifecycle.upstream(str(moved / "reduce")) == {
        "reduce": str(moved / "reduce"),
        "embed": str(moved / "embed"),
        "ingest": str(moved / "images"),
    }


def test_describe_change_names_what_changed():
    assert lifecycle.describe_change({"k": 50, "input": "a"}, {"k": 10, "input": "b"}) == "the input changed, k 50 → 10"
    assert "earlier m9" in lifecycle.describe_change({}, {"k": 10})


def _finish(out: Path, stage, print_: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lifecycle.write_manifest(str(out), Manifest(stage=stage.name, input="/in", fingerprint=print_, counts={}))


def test_prepare_skips_refuses_and_resumes(tmp_path):
    out = tmp_path / "reduce"
    k50, k10 = {"input": "embed:1", "k": 50}, {"input": "embed:1", "k": 10}
    assert lifecycle.prepare(REDUCE, str(out), k50, overwrite=False) is None  # fresh
    (out / "pca").mkdir()  # interrupted after pca/, before its manifest
    (out / "pca" / "part-0.parquet").write_bytes(b"x")
    assert lifecycle.prepare(REDUCE, str(out), k50, overwrite=False) is None  # resumed, not refused
    with pytest.raises(InputError, match=r"interrupted `m9 reduce` run made differently \(k 50 → 10\)"):
        lifecycle.prepare(REDUCE, str(out), k10, overwrite=False)
    _finish(out, REDUCE, k50)
    assert lifecycle.prepare(REDUCE, str(out), k50, overwrite=False).skipped
    with pytest.raises(InputError, match=r"finished `m9 reduce` output made differently \(k 50 → 10\)"):
        lifecycle.prepare(REDUCE, str(out), k10, overwrite=False)
    assert (out / "pca" / "part-0.parquet").exists()  # refused means untouched
    assert lifecycle.prepare(REDUCE, str(out), k10, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == [contract.PENDING]


def test_an_output_whose_input_alone_changed_is_updated_not_refused(tmp_path):
    out = tmp_path / "reduce"
    old, grown = {"input": "embed:1", "k": 50}, {"input": "embed:2", "k": 50}
    grown_k10 = {**grown, "k": 10}
    assert lifecycle.prepare(REDUCE, str(out), old, overwrite=False) is None
    (out / "pca").mkdir()
    (out / "pca" / "part-0.parquet").write_bytes(b"x")
    _finish(out, REDUCE, old)
    # An input and an option changed: refused, untouched.
    with pytest.raises(InputError, match=r"made differently \(the input changed, k 50 → 10\)"):
        lifecycle.prepare(REDUCE, str(out), grown_k10, overwrite=False)
    assert (out / contract.MANIFEST).exists() and (out / "pca" / "part-0.parquet").exists()
    # The input alone: a stage that updates in place keeps its files (less the manifest) ...
    assert lifecycle.prepare(REDUCE, str(out), grown, overwrite=False, in_place=True) is None
    assert sorted(p.name for p in out.iterdir()) == [contract.PENDING, "pca"]
    assert json.loads((out / contract.PENDING).read_text()) == grown
    # ... and an interrupted update whose input changed again is updated too; any other stage starts afresh.
    assert lifecycle.prepare(REDUCE, str(out), old, overwrite=False) is None
    assert sorted(p.name for p in out.iterdir()) == [contract.PENDING]
    assert not lifecycle.only_input_changed({}, grown) and not lifecycle.only_input_changed(old, old)


def test_prepare_refuses_foreign_files_and_other_stages(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="files m9 did not write"):
        lifecycle.prepare(EMBED, str(out), {"k": 1}, overwrite=False)
    (out / "holiday.jpg").unlink()
    _finish(out, INGEST, {"x": 1})
    with pytest.raises(InputError, match="holds the output of `m9 ingest`"):
        lifecycle.prepare(EMBED, str(out), {"x": 1}, overwrite=False)


def test_each_stage_owns_what_it_writes():
    assert REDUCE.owns("pca") and REDUCE.owns("pca.csv") and REDUCE.owns("variance.json")
    assert EMBED.owns("embeddings") and EMBED.owns("errors") and not EMBED.owns("pca")
    assert INGEST.owns("part-00000-abc.snappy.parquet") and INGEST.owns(".part-0.crc") and INGEST.owns("_SUCCESS")
    assert not INGEST.owns("embeddings")


def test_embed_fingerprint_holds_the_model_identity_and_names_a_change(tmp_path):
    import dataclasses

    from m9.model.spec import ModelSpec
    from m9.model.weights import EXPECTED_CHECKSUM
    from m9.stages.embed import fingerprint

    (tmp_path / "images").mkdir()
    base = EmbedConfig(input=str(tmp_path / "images"), output=str(tmp_path / "e"))
    model = ModelSpec(
        runtime="onnx", precision="fp32", data=b"m", sha256="5" * 64, source="m.onnx", weights=EXPECTED_CHECKSUM
    )
    a = fingerprint(base, base.input, model)
    assert model.identity().items() <= a.items()
    # An .onnx file is identified by its sha256, a Keras file by its arrays' checksum.
    other = dataclasses.replace(model, weights="sha256:" + "7" * 64)
    assert "weights c009b1f1262c" in lifecycle.describe_change(a, fingerprint(base, base.input, other))
    int8 = dataclasses.replace(model, precision="int8", sha256="9" * 64)
    assert "precision fp32 → int8" in lifecycle.describe_change(a, fingerprint(base, base.input, int8))
    same = EmbedConfig(input=base.input, output=base.output, actors=7, batch_size=3)
    assert a == fingerprint(same, base.input, model)


HOLD = """
import sys, time
from m9.io import lease
with lease.hold(sys.argv[1], "embed"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_local_writer_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "embed"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lease.OutputBusyError, match=rf"`m9 embed` \(pid {holder.pid} on {socket.gethostname()}"):
            with lease.hold(str(out), "embed"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lease.hold(str(out), "embed") as me:  # the kernel released the dead holder's lock
        assert json.loads((out / contract.LEASE).read_text())["pid"] == me.pid == os.getpid()
    assert not (out / contract.LEASE).exists()


def test_a_refused_stage_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with lease.hold(str(out), "reduce"):
            lifecycle.prepare(REDUCE, str(out), {"k": 1}, overwrite=False)
            raise RuntimeError("k out of range")
    assert not out.exists()


@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on loopback with one bucket, and the environment m9 reads pointed at it."""
    from m9.io import storage

    with moto_server() as port, pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, f"http://127.0.0.1:{port}", "k", "s")
        client = storage.s3_client()
        client.create_bucket(Bucket="lease")
        yield client


def _plant(client, key: str, holder: lease.Holder) -> None:
    client.put_object(Bucket="lease", Key=key, Body=holder.to_bytes())


def test_s3_lease_refuses_a_live_writer_and_takes_over_a_dead_one(moto_s3):
    out = "s3://lease/run1/embed"
    with lease.hold(out, "embed") as me:
        body = moto_s3.get_object(Bucket="lease", Key=f"run1/embed/{contract.LEASE}")["Body"].read()
        assert lease.Holder.parse(body) == me
        with pytest.raises(lease.OutputBusyError, match=rf"pid {os.getpid()} on"):
            with lease.hold(out, "embed"):
                pass
    assert "Contents" not in moto_s3.list_objects_v2(Bucket="lease", Prefix="run1/")  # released
    # A killed writer on this host: its process is gone, so its lease is taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(moto_s3, f"run1/embed/{contract.LEASE}", lease.Holder(socket.gethostname(), dead.pid, "t", "embed"))
    with lease.hold(out, "embed") as me:
        body = moto_s3.get_object(Bucket="lease", Key=f"run1/embed/{contract.LEASE}")["Body"].read()
        assert lease.Holder.parse(body) == me


def test_s3_lease_of_another_host_waits_for_its_ttl(moto_s3):
    out = "s3://lease/run2/embed"
    _plant(moto_s3, f"run2/embed/{contract.LEASE}", lease.Holder("elsewhere", 1, "t", "embed"))
    with pytest.raises(lease.OutputBusyError, match=r"on elsewhere.*expires in \d+ s"):
        with lease.hold(out, "embed"):
            pass
    time.sleep(2.2)  # moto's LastModified has whole seconds
    with lease.hold(out, "embed", ttl_s=1) as me:
        body = moto_s3.get_object(Bucket="lease", Key=f"run2/embed/{contract.LEASE}")["Body"].read()
        assert lease.Holder.parse(body) == me


def test_s3_lease_is_renewed_while_held(moto_s3):
    key = f"run3/embed/{contract.LEASE}"
    with lease.hold("s3://lease/run3/embed", "embed", renew_s=0.3):
        first = moto_s3.head_object(Bucket="lease", Key=key)["LastModified"]
        time.sleep(2.2)  # LastModified has whole seconds
        assert moto_s3.head_object(Bucket="lease", Key=key)["LastModified"] > first


def _contract_names() -> tuple[set[str], set[str]]:
    """(file names, folder names) a workdir's layout has, as contract.py states them."""
    files = {contract.MANIFEST, contract.PENDING, contract.LEASE, contract.RUN_RECORD}
    folders = {contract.BENCH_DIR, contract.EMBEDDINGS, contract.ERRORS, contract.PCA_DIR}
    for stage in contract.STAGES.values():
        folders.add(stage.folder)
        files.update(name for name in stage.files if "*" not in name)
        files.update(name for name in stage.writes if name and "*" not in name and "." in name)
    return files, folders


#: Modules that build paths into a workdir (or name its spaces) and must ask contract.py for the names.
_CALLERS = ("m9/stages/report.py", "m9/stages/evaluate.py", "m9/stages/pipeline.py", "m9/bench/config.py")


def test_a_workdirs_names_are_spelled_only_in_contract_py():
    """A file name of the layout anywhere in m9/, or a folder name joined into a path or listed with
    another, or a space name of evaluate, outside contract.py, is a second spelling that can drift."""
    import re

    files, folders = _contract_names()
    quoted = r"[\"']({})[\"']"
    file_re = re.compile(quoted.format("|".join(map(re.escape, sorted(files)))))
    folder = quoted.format("|".join(map(re.escape, sorted(folders))))
    path_re = re.compile(rf"(join|Path|output_dir)\([^)]*{folder}|\(\s*{folder}\s*,\s*{folder}")
    space_re = re.compile(quoted.format("|".join(contract.SPACES)))
    found = []
    for path in sorted((REPO / "m9").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "m9/stages/contract.py":
            continue
        callers = rel in _CALLERS or rel.startswith("m9/cli/")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if file_re.search(code) or (callers and (path_re.search(code) or space_re.search(code))):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []
