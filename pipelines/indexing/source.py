"""The catalog source as the index job reads it: its Parquet files, every row's id (duplicates and
deletions need the whole run's ids before the stream starts) and the metadata columns it carries."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import S3Settings, filesystem_for


def source_ids(files: list[str], uri: str, s3: S3Settings, id_col: str) -> pa.ChunkedArray:
    """Only the id column of every file: duplicates and deletions need the whole run's ids."""
    fs, _ = filesystem_for(uri, s3)
    chunks = []
    for path in files:
        with fs.open_input_file(path) as f:
            chunks.extend(pq.read_table(f, columns=[id_col]).column(id_col).chunks)
    return pa.chunked_array(chunks, pa.string()) if chunks else pa.chunked_array([], pa.string())


def metadata_fields(
    files: list[str], uri: str, s3: S3Settings, wanted: list[str]
) -> list[pa.Field]:
    """The fields of ``wanted`` that the catalog has (read from its first file's schema)."""
    fs, _ = filesystem_for(uri, s3)
    with fs.open_input_file(files[0]) as f:
        schema = pq.ParquetFile(f).schema_arrow
    return [schema.field(name) for name in wanted if name in schema.names]
