"""Input preparation: the ingested rows every engine reads, cut or cycled to --limit, as one Parquet file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from m9.errors import InputError
from m9.io import storage
from m9.stages import contract


def load_rows(input_uri: str | None, workdir: Path) -> pa.Table:
    """The image rows of an ingest output (a folder of Parquet); with no input, the bundled sample ingested."""
    if input_uri is None:
        from m9.config import IngestConfig
        from m9.stages.ingest import ingest
        from m9.stages.pipeline import sample_dir

        input_uri = str(workdir / "sample-images")
        ingest(IngestConfig(input=sample_dir(), output=input_uri))
    src = storage.normalize(input_uri)
    files = storage.list_files(src, ".parquet")
    if not files:
        raise InputError(f"no Parquet files in {src}; pass the output of `m9 ingest` as --input")
    contract.check_columns(contract.EMBED, src, files[0])
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=list(contract.EMBED.needs)))
    table = pa.concat_tables(tables)
    return table.take(pa.compute.sort_indices(table, [("image_id", "ascending")]))


def take(table: pa.Table, n: int | None) -> pa.Table:
    """The first n rows; cycles through the rows again (ids suffixed ~1, ~2 …) when n exceeds them."""
    if n is None or n == table.num_rows:
        return table
    if n < table.num_rows:
        return table.slice(0, n)
    parts: list[pa.Table] = []
    copy = 0
    while sum(p.num_rows for p in parts) < n:
        part = table.slice(0, n - sum(p.num_rows for p in parts))
        if copy:
            ids = pa.array([f"{i}~{copy}" for i in part.column("image_id").to_pylist()], pa.string())
            part = part.set_column(part.schema.get_field_index("image_id"), "image_id", ids)
        parts.append(part)
        copy += 1
    return pa.concat_tables(parts)


def write_input(table: pa.Table, folder: Path) -> str:
    """The rows as one Parquet file in `folder`, in row groups as m9 ingest sizes them (by bytes), so the
    engines read what `m9 embed` reads: 100-row groups of 12-MP photos were 120 MB, and each of the Ray
    engine's 32-row work items read one or two whole groups (78 instead of 96 photos/s)."""
    from m9.stages.ingest import row_group_rows

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=row_group_rows(table))
    return str(folder)
