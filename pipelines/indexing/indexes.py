"""The products table's indexes: the ANN index on the image embedding and the full-text index on
the normalised title, built once and then updated incrementally by each run that changes rows."""

from __future__ import annotations

import logging

from pipelines.config import AppConfig

logger = logging.getLogger(__name__)

ANN_INDEX = "image_embedding_idx"
FTS_INDEX = "title_normalized_idx"


def _ann_mismatch(products, existing, cfg: AppConfig) -> str | None:
    """Why the existing ANN index must be built again (None when an update will do): another index
    type, metric or configured partition count, or no live row left in it (Lance would retrain it
    on the new rows alone, with partitions of its own choosing)."""
    idx = existing[ANN_INDEX]
    if not idx.num_indexed_rows:  # the run replaced every row: nothing of the old index is live
        return "it indexes no live row"
    want = cfg.index.ann_index_type
    if idx.index_type.replace("_", "").lower() != want.replace("_", "").lower():
        return f"index type {idx.index_type}, configured {want}"
    metric = (idx.index_details or {}).get("metric_type")
    if metric and str(metric).lower() != "cosine":
        return f"metric {metric}, expected cosine"
    if cfg.index.ann_num_partitions:
        stats = products.to_lance().stats.index_stats(ANN_INDEX)
        got = {seg.get("num_partitions") for seg in stats.get("indices") or []}
        if got != {cfg.index.ann_num_partitions}:
            return f"{sorted(got, key=str)} partitions, configured {cfg.index.ann_num_partitions}"
    return None


def build_indexes(products, cfg: AppConfig, n_rows: int, *, changed: bool) -> str | None:
    """The ANN index (IVF-type once there are enough rows to train it; exact search below) and the
    full-text index on the normalised title.

    An index is built from scratch only when there is none (or the ANN index's type, metric or
    configured partitions changed); otherwise a run that changed rows updates the existing indexes
    incrementally: only its new rows are indexed, as a delta segment of each index (the ANN delta
    uses the trained partitions: no retraining); maintenance (``pipelines.indexing.maintenance``) merges the deltas.
    Unchanged data keeps its indexes. Rows an index does not cover yet are still found (searched
    exhaustively), so correctness never depends on this step, only latency."""
    from lancedb.index import FTS

    existing = {i.name: i for i in products.list_indices()}
    ann = None
    update: list[str] = []
    if n_rows >= cfg.index.ann_min_rows:
        partitions = cfg.index.ann_num_partitions or max(1, int(n_rows**0.5))
        why = _ann_mismatch(products, existing, cfg) if ANN_INDEX in existing else "none yet"
        if why is not None:
            logger.info("building the ANN index from scratch (%s)", why)
            products.create_index(
                metric="cosine",
                vector_column_name="image_embedding",
                index_type=cfg.index.ann_index_type,
                num_partitions=partitions,
                replace=True,
            )
            stats = products.index_stats(ANN_INDEX)
            if (
                stats is None or stats.num_indexed_rows == 0
            ):  # an index trained on too few rows indexes nothing
                raise RuntimeError(f"ANN index on {n_rows} rows indexed nothing: {stats}")
            ann = f"{cfg.index.ann_index_type}({partitions})"
        else:
            ann = f"{cfg.index.ann_index_type} ({'updated incrementally' if changed else 'unchanged'})"
            update += [ANN_INDEX] if changed else []
    elif ANN_INDEX in existing and changed:  # fewer rows than ann_min_rows now: keep it current
        update.append(ANN_INDEX)
    if n_rows and FTS_INDEX not in existing:
        products.create_index("title_normalized", config=FTS(), replace=True)
    elif FTS_INDEX in existing and changed:
        update.append(FTS_INDEX)
    if update:
        # num_indices_to_merge=0: index only the new rows, as a delta segment beside the old
        # ones (Lance's default may rewrite a small index whole); maintenance merges the deltas.
        products.to_lance().optimize.optimize_indices(index_names=update, num_indices_to_merge=0)
        products.checkout_latest()
        logger.info("indexes %s updated incrementally", update)
    return ann
