"""Vector columns as FixedSizeList: m9's outputs read by DuckDB and Polars; old variable-length outputs still read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from m9.config import FEATURE_DIM
from m9.stages import contract
from tests.conftest import TEST_K


def _old_and_new(n: int = 5, width: int = 7) -> tuple[np.ndarray, pa.Table, pa.Table]:
    x = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), width)
    new = pa.table({"image_id": [str(i) for i in range(n)], "v": fixed})
    old = pa.table({"image_id": [str(i) for i in range(n)], "v": fixed.cast(pa.list_(pa.float32()))})
    return x, old, new


def test_the_contract_states_fixed_size_vectors():
    assert contract.EMBED.writes[contract.EMBEDDINGS].field("features").type == pa.list_(pa.float32(), FEATURE_DIM)
    assert contract.pca_schema(12).field("pca").type == pa.list_(pa.float32(), 12)
    assert contract.pca_schema(12).names == list(contract.REDUCE.columns(contract.PCA_DIR))


def test_old_variable_length_lists_read_as_the_same_matrix(tmp_path):
    x, old, new = _old_and_new()
    for table in (old, new):
        pq.write_table(table, tmp_path / "t.parquet")
        back = pq.read_table(tmp_path / "t.parquet")
        got = contract.vectors(back, "v")
        assert got.dtype == np.float32 and np.array_equal(got, x)
        assert contract.as_fixed(back, "v").schema.field("v").type == pa.list_(pa.float32(), 7)
    assert np.array_equal(contract.vectors(old.slice(2, 2), "v"), x[2:4])  # a slice's offsets are honoured
    assert contract.vectors(new.slice(0, 0), "v").shape == (0, 7)


@pytest.mark.slow
def test_duckdb_and_polars_read_m9s_outputs(pipeline):
    import duckdb
    import polars as pl

    embeddings = f"{pipeline['dirs']['embed']}/embeddings"
    pca = f"{pipeline['dirs']['reduce']}/pca"
    table = pq.read_table(embeddings).sort_by("image_id")
    x = contract.vectors(table, "features")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    # DuckDB over Arrow sees FLOAT[1280]: array_cosine_similarity takes the column as it is.
    con = duckdb.connect()
    con.register("features", ds.dataset(embeddings))
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM features)").fetchall())
    assert types["features"] == "FLOAT[1280]"
    first = table.column("image_id")[0].as_py()
    rows = con.sql(
        "SELECT f.image_id, array_cosine_similarity(f.features, q.features) AS s FROM features f, "
        f"(SELECT features FROM features WHERE image_id = '{first}') q ORDER BY f.image_id"
    ).fetchall()
    np.testing.assert_allclose([s for _, s in rows], unit @ unit[0], atol=1e-5)
    # Its own Parquet reader sees a list; a cast gives the array type.
    one = con.sql(f"SELECT features::FLOAT[1280] AS f FROM read_parquet('{embeddings}/*.parquet') LIMIT 1")
    assert one.types[0] == "FLOAT[1280]"
    assert con.sql(f"SELECT count(*) FROM read_parquet('{pca}/*.parquet')").fetchall()[0][0] == len(table)

    frame = pl.read_parquet(f"{embeddings}/*.parquet").sort("image_id")
    assert frame.schema["features"] == pl.Array(pl.Float32, FEATURE_DIM)
    assert np.array_equal(frame["features"].to_numpy(), x)
    pcs = pl.read_parquet(f"{pca}/*.parquet")
    assert pcs.schema["pca"] == pl.Array(pl.Float32, TEST_K)
