"""`m9 reduce --basis keep`: a changed input projected onto the basis the output holds, instead of a new fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m9.config import ReduceConfig
from m9.errors import InputError
from m9.stages import contract, lifecycle
from m9.stages.contract import BASIS_NAME, EMBEDDINGS, MANIFEST, PCA_DIR, REDUCE, VARIANCE_NAME
from m9.stages.lifecycle import Manifest
from m9.stages.pca import Basis, project, read_basis
from m9.stages.reduce import stored_basis
from tests.conftest import TEST_K


def _basis(k: int = 3, dim: int = 8, seed: int = 0) -> Basis:
    rng = np.random.default_rng(seed)
    components, _ = np.linalg.qr(rng.normal(size=(dim, k)))
    return Basis(
        mean=rng.normal(size=dim),
        components=components,
        ratios=np.array([0.5, 0.3, 0.1][:k]),
        fitted_on="embed:abc",
        fitted_input="/w/embed",
        fitted_at="2026-12-04T01:00:00+00:00",
        fitted_rows=7,
    )


def test_project_is_the_centered_product_and_the_same_bits_in_any_batch():
    basis = _basis(dim=1280, k=3)
    x = np.random.default_rng(1).normal(size=(64, 1280)).astype(np.float32)
    coords = project(x, basis.mean, basis.components)
    assert coords.dtype == np.float32 and coords.shape == (64, 3)
    assert np.allclose(coords, (x.astype(np.float64) - basis.mean) @ basis.components, atol=1e-5)
    for i in (0, 5, 63):  # alone, or beside other rows: the same bits
        assert project(x[i : i + 1], basis.mean, basis.components)[0].tobytes() == coords[i].tobytes()
    assert project(x[:0], basis.mean, basis.components).shape == (0, 3)


def test_the_basis_file_round_trips_bit_for_bit(tmp_path):
    basis = _basis()
    (tmp_path / BASIS_NAME).write_bytes(basis.to_bytes())
    back = read_basis(str(tmp_path))
    assert back.mean.tobytes() == basis.mean.tobytes() and back.components.tobytes() == basis.components.tobytes()
    assert (back.fitted_on, back.fitted_at, back.fitted_rows, back.k) == ("embed:abc", basis.fitted_at, 7, 3)
    assert read_basis(str(tmp_path / "none")) is None
    assert BASIS_NAME in REDUCE.files and REDUCE.owns(BASIS_NAME)


def test_a_refit_on_a_changed_input_is_an_update_but_a_basis_alone_is_a_change():
    old = {"input": "embed:1", "k": 50, "basis": "embed:1"}
    assert lifecycle.only_input_changed(old, {**old, "input": "embed:2"}, REDUCE.follows_input)  # keep
    assert lifecycle.only_input_changed(old, {**old, "input": "embed:2", "basis": "embed:2"}, REDUCE.follows_input)
    assert not lifecycle.only_input_changed(old, {**old, "basis": "embed:2"}, REDUCE.follows_input)
    assert not lifecycle.only_input_changed(old, {**old, "input": "embed:2", "basis": "embed:2"})


def test_keep_with_another_k_is_refused_with_its_reason(tmp_path):
    out = tmp_path / "reduce"
    out.mkdir()
    print_ = {"input": "embed:1", "k": 3, "variance_target": None, "basis": "embed:1"}
    lifecycle.write_manifest(str(out), Manifest(stage=REDUCE.name, input="/in", fingerprint=print_, counts={}))
    assert stored_basis(str(out), ReduceConfig(input="x", output=str(out), k=3, basis="keep")) is None  # no file
    (out / BASIS_NAME).write_bytes(_basis().to_bytes())
    assert stored_basis(str(out), ReduceConfig(input="x", output=str(out), k=3, basis="keep")).k == 3
    with pytest.raises(InputError, match=r"fitted with --k 3 \(k=3\): --k auto:0.9 needs a new fit; pass --k 3"):
        stored_basis(str(out), ReduceConfig(input="x", output=str(out), k=None, variance_target=0.9, basis="keep"))


def test_a_refit_over_a_kept_basis_is_refused(tmp_path):
    from m9.stages.reduce import reduce

    embed = tmp_path / "embed"
    (embed / EMBEDDINGS).mkdir(parents=True)
    x = np.zeros((2, contract.FEATURES_TYPE.list_size), np.float32)
    rows = {"image_id": ["a", "b"], "path": ["a", "b"], "label": ["l", "l"], "split": [None, None]}
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({**rows, "features": features}), embed / EMBEDDINGS / "part-0.parquet")
    out = tmp_path / "reduce"
    out.mkdir()
    kept = {"input": "embed:2", "k": 3, "variance_target": None, "basis": "embed:1"}
    lifecycle.write_manifest(str(out), Manifest(stage=REDUCE.name, input="/in", fingerprint=kept, counts={}))
    (out / BASIS_NAME).write_bytes(_basis().to_bytes())
    with pytest.raises(InputError, match="pass --basis keep to project onto it again, or --overwrite"):
        reduce(ReduceConfig(input=str(embed), output=str(out), k=3))
    assert sorted(p.name for p in out.iterdir()) == sorted([BASIS_NAME, MANIFEST])  # untouched


def test_the_cli_takes_refit_or_keep():
    from click.testing import CliRunner

    from m9.cli import main

    result = CliRunner().invoke(main, ["reduce", "--basis", "again"])
    assert result.exit_code == 2 and "'refit', 'keep'" in result.output
    for command in ("reduce", "run"):
        assert "--basis [refit|keep]" in CliRunner().invoke(main, [command, "--help"]).output


def _changed_embed(embed_dir: str, out: Path, drop_every: int = 8, added: int = 20) -> tuple[set, set]:
    """A copy of an embed output with every drop_every-th image gone and `added` new ones (other features),
    with a manifest of its own; returns (the ids kept, the ids added)."""
    table = pq.read_table(Path(embed_dir, EMBEDDINGS)).sort_by("image_id")
    keep = [i for i in range(table.num_rows) if i % drop_every]
    kept = table.take(keep)
    donors = table.slice(0, added)
    features = contract.vectors(donors, "features")
    new = pa.table(
        {
            "image_id": [f"new{i:013d}" for i in range(added)],
            "path": [f"/new/{i}.jpg" for i in range(added)],
            "label": donors.column("label"),
            "split": donors.column("split"),
            "features": pa.FixedSizeListArray.from_arrays(
                pa.array((np.roll(features, 7, axis=1) * 1.5).ravel()), contract.FEATURES_TYPE.list_size
            ),
        }
    )
    schema = contract.EMBED.writes[EMBEDDINGS]
    (out / EMBEDDINGS).mkdir(parents=True)
    pq.write_table(pa.concat_tables([kept.cast(schema), new.cast(schema)]), out / EMBEDDINGS / "part-0.parquet")
    print_ = {"input": f"changed:{out.name}", "m9_version": "test"}
    lifecycle.write_manifest(
        str(out), Manifest(stage="embed", input=str(out.parent / "gone"), fingerprint=print_, counts={})
    )
    return set(kept.column("image_id").to_pylist()), set(new.column("image_id").to_pylist())


def _pca(folder: Path) -> dict[str, bytes]:
    table = pq.read_table(folder / PCA_DIR)
    rows = contract.vectors(table, "pca")
    return dict(zip(table.column("image_id").to_pylist(), (r.tobytes() for r in rows), strict=True))


@pytest.mark.slow
def test_keep_projects_a_changed_input_onto_the_stored_basis(pipeline, spark, tmp_path):
    from m9.stages.evaluate import EvaluateConfig, evaluate
    from m9.stages.reduce import reduce

    fitted = Path(pipeline["dirs"]["reduce"])
    out = tmp_path / "reduce"
    shutil.copytree(fitted, out)
    before, basis_bytes = _pca(fitted), (fitted / BASIS_NAME).read_bytes()
    basis = read_basis(str(fitted))
    assert basis.k == TEST_K and basis.fitted_on == lifecycle.input_identity(pipeline["dirs"]["embed"])
    assert pipeline["reduce"].details["basis"]["kind"] == "fitted"
    changed = tmp_path / "embed2"
    unchanged, added = _changed_embed(pipeline["dirs"]["embed"], changed)

    result = reduce(ReduceConfig(input=str(changed), output=str(out), k=TEST_K, basis="keep"))
    assert not result.skipped and result.counts["rows"] == len(unchanged) + len(added)
    assert result.details["basis"]["kind"] == "kept" and result.details["basis"]["fitted_on"] == basis.fitted_on
    assert result.fingerprint["basis"] == basis.fitted_on != result.fingerprint["input"]
    after = _pca(out)
    assert set(after) == unchanged | added
    assert all(after[i] == before[i] for i in unchanged)  # bit for bit
    assert (out / BASIS_NAME).read_bytes() == basis_bytes
    table = pq.read_table(changed / EMBEDDINGS)
    ids, x = table.column("image_id").to_pylist(), contract.vectors(table, "features")
    new = np.array([ids.index(i) for i in sorted(added)])
    expected = (x[new].astype(np.float64) - basis.mean) @ basis.components
    got = np.stack([np.frombuffer(after[i], np.float32) for i in sorted(added)])
    assert np.allclose(got, expected, atol=1e-5)
    variance = json.loads((out / VARIANCE_NAME).read_text())
    assert variance["basis"]["kind"] == "kept" and "kept" in variance["basis_note"]
    coords = np.stack([np.frombuffer(after[i], np.float32) for i in ids]).astype(np.float64)
    share = coords.var(axis=0, ddof=1) / x.astype(np.float64).var(axis=0, ddof=1).sum()
    assert np.allclose(variance["explained_variance_ratio"], share, rtol=1e-4)
    # The same command again is done; evaluate reads the kept output as any other.
    assert reduce(ReduceConfig(input=str(changed), output=str(out), k=TEST_K, basis="keep")).skipped
    scored = evaluate(EvaluateConfig(input=str(out), output=str(tmp_path / "evaluate")))
    assert scored.details["dims"]["pca"] == TEST_K

    # Another k cannot keep this basis; a refit of the same input over a kept basis is a change, refused.
    with pytest.raises(InputError, match=rf"fitted with --k {TEST_K} \(k={TEST_K}\): --k 5 needs a new fit"):
        reduce(ReduceConfig(input=str(changed), output=str(out), k=5, basis="keep"))
    with pytest.raises(InputError, match=r"holds coordinates on a basis kept with --basis keep"):
        reduce(ReduceConfig(input=str(changed), output=str(out), k=TEST_K, basis="refit"))
    assert (out / MANIFEST).exists()
    # A refit moves the unchanged images (another mean and other components).
    refit = reduce(ReduceConfig(input=str(changed), output=str(tmp_path / "refit"), k=TEST_K, basis="refit"))
    assert refit.details["basis"]["kind"] == "fitted"
    moved = _pca(tmp_path / "refit")
    assert sum(moved[i] != after[i] for i in unchanged) > len(unchanged) // 2

    # An update interrupted after it started (manifest gone, pca/ half written) keeps the basis, and the
    # next input is projected onto it still.
    third = tmp_path / "embed3"
    unchanged3, _ = _changed_embed(pipeline["dirs"]["embed"], third, drop_every=5, added=3)
    print_ = {**result.fingerprint, "input": lifecycle.input_identity(str(third))}
    assert lifecycle.prepare(REDUCE, str(out), print_, overwrite=False, in_place=True) is None
    for part in sorted((out / PCA_DIR).glob("part-*"))[:1]:
        part.write_bytes(b"half")
    again = reduce(ReduceConfig(input=str(third), output=str(out), k=TEST_K, basis="keep"))
    assert again.details["basis"]["fitted_on"] == basis.fitted_on
    final = _pca(out)
    assert all(final[i] == before[i] for i in unchanged3)


def test_m9_run_hands_basis_to_reduce_and_the_report_says_which():
    from m9.cli.options import config_fields
    from m9.cli.stages import k_summary
    from m9.stages.report import basis_text

    fields = config_fields(ReduceConfig, {"k": (50, None), "basis": "keep", "actors": 2})
    assert fields == {"k": 50, "variance_target": None, "basis": "keep"}
    kept = _basis().describe("kept")
    assert basis_text(kept) == "kept (--basis keep) from a fit on 7 images at 2026-12-04T01:00:00+00:00"
    assert basis_text(_basis().describe("fitted")).startswith("fitted on these images")
    assert k_summary({"k": 3, "basis": kept}) == "k=3 on the basis kept from 2026-12-04T01:00:00+00:00 (7 images)"
    assert k_summary({"k": 3, "basis": _basis().describe("fitted")}) == "k=3"
