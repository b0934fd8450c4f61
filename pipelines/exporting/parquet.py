"""Writing Parquet: record batches streamed into ``part-<i>.parquet`` files, in hive folders
``<col>=<value>/`` when partitioned, with the export's provenance in every file's metadata.

Rows are streamed: LanceDB is scanned ``export.batch_rows`` rows at a time
(``export.read_ahead_mb`` of read-ahead) straight into the Parquet writer, one batch at a time; a
hive partition buffers at most one row group and at most ``export.max_open_files`` partitions are
open, so memory is bounded by the configuration, never by the table size.

Test hook: with ``PIPELINES_EXPORT_TEST_PAUSE=<path>`` set, the export writes ``<path>`` once its
first data file is closed and then sleeps, so a test can kill it at a known point.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.config import AppConfig, ExportConfig
from pipelines.exporting.errors import ExportError
from pipelines.exporting.source import EMBEDDING, IMAGE_COLUMNS
from pipelines.storage import join

logger = logging.getLogger(__name__)

NO_DICTIONARY = frozenset({EMBEDDING, *IMAGE_COLUMNS})
PAUSE_ENV = "PIPELINES_EXPORT_TEST_PAUSE"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # the folder of null partition values


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the export folder
    rows: int
    bytes: int


@dataclass
class Progress:
    """Rows through the writer, logged every ``every_s`` seconds."""

    label: str
    every_s: float
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)

    def add(self, n: int) -> None:
        self.rows += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self.rows / max(now - self.started, 1e-9)
            logger.info("%s: %d rows (%.0f rows/s)", self.label, self.rows, rate)


def with_metadata(
    reader: pa.RecordBatchReader, metadata: dict[str, str], progress: Progress
) -> pa.RecordBatchReader:
    """``reader`` with ``metadata`` on its schema (so on every file), counting rows as they pass."""
    schema = reader.schema.with_metadata(metadata)

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            progress.add(batch.num_rows)
            yield batch

    return pa.RecordBatchReader.from_batches(schema, batches())


def _pause_hook() -> Callable[[int], None]:
    marker = os.environ.get(PAUSE_ENV)

    def after_file(n_files: int) -> None:
        if marker and n_files == 1:
            Path(marker).write_text(str(os.getpid()))
            logger.warning("%s set: pausing after the first file", PAUSE_ENV)
            time.sleep(600)

    return after_file


class PartFiles:
    """``part-<i>.parquet`` files in one folder: a new file every ``max_rows_per_file`` rows."""

    def __init__(
        self, fs: pafs.FileSystem, root: str, folder: str, schema: pa.Schema, cfg: ExportConfig
    ):
        self.fs, self.root, self.folder, self.schema, self.cfg = fs, root, folder, schema, cfg
        self.next_index = 0
        self._path = ""
        self._writer = None
        self._stream = None
        self._rows = 0

    def start(self) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self.next_index}.parquet"
        self._path = join(self.folder, name) if self.folder else name  # relative to the root
        self.next_index += 1
        self._stream = self.fs.open_output_stream(join(self.root, self._path))
        self._writer = pq.ParquetWriter(
            self._stream,
            self.schema,
            compression=self.cfg.compression,
            # Dictionaries only pay for repeated values: not for embedding floats or JPEG bytes.
            use_dictionary=[f.name for f in self.schema if f.name not in NO_DICTIONARY],
        )
        self._rows = 0

    def write(self, table: pa.Table) -> list[WrittenFile]:
        """Write ``table`` as row groups; returns the files this call completed."""
        done = []
        while table.num_rows:
            if self._writer is None:
                self.start()
            take = min(table.num_rows, self.cfg.max_rows_per_file - self._rows)
            self._writer.write_table(table.slice(0, take), row_group_size=self.cfg.row_group_rows)
            self._rows += take
            table = table.slice(take)
            if self._rows >= self.cfg.max_rows_per_file:
                done.append(self.close())
        return done

    def close(self) -> WrittenFile | None:
        if self._writer is None:
            return None
        self._writer.close()
        size = self._stream.tell()
        self._stream.close()
        self._writer = self._stream = None
        return WrittenFile(self._path, self._rows, size)


def _hive_value(value: Any) -> str:
    from urllib.parse import quote

    if value is None:
        return HIVE_NULL
    if isinstance(value, bool):
        return str(value).lower()
    return quote(str(value), safe="")


class ParquetSink:
    """Streams record batches into Parquet files under ``root``, partitioned (hive) or not.

    Memory: each partition buffers at most one row group (``min(row_group_rows, batch_rows)``
    rows) and at most ``max_open_files`` partitions are open (the least recently written one is
    closed when another opens; its next rows start a new file), so the bound is
    ``max_open_files x group`` rows whatever the table size.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        schema: pa.Schema,
        cfg: ExportConfig,
        partition_by: Sequence[str] = (),
    ):
        self.fs, self.root, self.cfg = fs, root, cfg
        self.partition_by = list(partition_by)
        self.schema = schema
        self.file_schema = pa.schema(
            [f for f in schema if f.name not in self.partition_by], metadata=schema.metadata
        )
        self.group_rows = min(cfg.row_group_rows, cfg.batch_rows)
        self.files: list[WrittenFile] = []
        self._parts: dict[tuple, PartFiles] = {}
        self._open: OrderedDict[tuple, list[pa.RecordBatch]] = OrderedDict()  # key -> buffer
        self._after_file = _pause_hook()

    def _done(self, written: Iterable[WrittenFile | None]) -> None:
        for f in written:
            if f is not None:
                self.files.append(f)
                self._after_file(len(self.files))

    def _flush(self, key: tuple) -> None:
        buffered = self._open[key]
        if buffered:
            self._done(self._parts[key].write(pa.Table.from_batches(buffered, self.file_schema)))
            self._open[key] = []

    def _part(self, key: tuple) -> list[pa.RecordBatch]:
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        if key not in self._parts:
            if len(self._parts) >= self.cfg.max_partitions:
                raise ExportError(
                    f"export.partition_by={self.partition_by} makes more than "
                    f"export.max_partitions={self.cfg.max_partitions} partitions"
                )
            folder = "/".join(
                f"{c}={_hive_value(v)}" for c, v in zip(self.partition_by, key, strict=True)
            )
            self._parts[key] = PartFiles(self.fs, self.root, folder, self.file_schema, self.cfg)
            if folder:
                self.fs.create_dir(join(self.root, folder), recursive=True)
        if len(self._open) >= self.cfg.max_open_files:
            oldest = next(iter(self._open))
            self._flush(oldest)
            self._done([self._parts[oldest].close()])
            del self._open[oldest]
        self._open[key] = []
        return self._open[key]

    def _split(self, batch: pa.RecordBatch) -> Iterator[tuple[tuple, pa.RecordBatch]]:
        if not self.partition_by:
            yield (), batch
            return
        import pyarrow.compute as pc

        keys = pa.Table.from_batches([batch.select(self.partition_by)])
        distinct = keys.group_by(self.partition_by, use_threads=False).aggregate([])
        for row in distinct.select(self.partition_by).to_pylist():
            mask = None
            for name in self.partition_by:
                col, value = batch.column(name), row[name]
                m = pc.is_null(col) if value is None else pc.fill_null(pc.equal(col, value), False)
                mask = m if mask is None else pc.and_(mask, m)
            yield (
                tuple(row[c] for c in self.partition_by),
                batch.filter(mask).drop_columns(self.partition_by),
            )

    def write(self, batch: pa.RecordBatch) -> None:
        for key, part in self._split(batch):
            buffered = self._part(key)
            buffered.append(part)
            if sum(b.num_rows for b in buffered) >= self.group_rows:
                self._flush(key)

    def close(self) -> list[WrittenFile]:
        for key in list(self._open):
            self._flush(key)
            self._done([self._parts[key].close()])
        self._open.clear()
        if not self.files:  # a zero-row export still has a file with the schema
            empty = PartFiles(self.fs, self.root, "", self.schema, self.cfg)
            empty.start()
            self._done([empty.close()])
        return sorted(self.files, key=lambda f: f.path)


def write_parquet(
    reader: pa.RecordBatchReader,
    fs: pafs.FileSystem,
    root: str,
    cfg: AppConfig,
    partition_by: Sequence[str] = (),
) -> list[WrittenFile]:
    """Stream ``reader`` into ``part-<i>.parquet`` files under ``root`` (hive folders
    ``<col>=<value>/`` for ``partition_by``), one batch at a time; returns the files written."""
    sink = ParquetSink(fs, root, reader.schema, cfg.export, partition_by)
    for batch in reader:
        sink.write(batch)
    return sink.close()
