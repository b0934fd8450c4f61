"""The demo catalog: vocabulary, titles, the product plan and rendering (``pipelines.catalog.writer`` writes it)."""
