"""The demo catalog: vocabulary, titles, the product plan and rendering (see pipelines.make_catalog)."""
