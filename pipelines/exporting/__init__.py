"""The stages of ``python -m pipelines.export`` (analyst Parquet exports), one per module:
``source`` resolves what is read (table, version, columns, filter) and scans it; ``queries`` turns
a query file into batch search result rows; ``parquet`` streams record batches into (hive
partitioned) Parquet files in bounded memory; ``output`` owns the output folder (the temporary
sibling, stale temporaries, the atomic commit); ``errors`` holds ``ExportError``. Importing the
package imports none of them; ``pipelines/export.py`` plans an export from them and is the CLI."""
