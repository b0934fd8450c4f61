"""The search-quality protocol: four tasks, every figure with a bootstrap 95% interval over queries.

One recall figure answers one question, so the protocol asks four, on the catalog that
``pipelines.catalog.writer`` writes (family-disjoint train / val / test splits):

- **Task A, the paper's task** (:func:`task_a`): each product's own titles (English, 汉字, pinyin)
  against the split's images, both ways, R@1/5/10 for ITC and ITC→ITM per ``k_test``. Comparable
  with BLIP's tables; a title is not what a shopper types, though.
- **ITM diagnostics** (:func:`itm_auc`): does the matching head tell a product's own title from a
  family sibling's (same product, another colour / pattern / material / brand) and from a random
  title? ROC AUC of the ITM logits; the re-rank can only help where this is well above 0.5.
- **Task B, shoppers** (:func:`task_b`): the held-out shopper queries rank every product of the
  split. A query such as "red sofa" is answered by every red sofa, so relevance comes from
  ``pipelines.catalog.relevance`` (same kind, every named attribute equal): success@1 and
  nDCG@10 over relevant products, and R@1/5/10 of the product the query was written for.
- **Task C, the service** (:func:`task_c`): Task B's figures through the service's own two-stage
  search (``pipelines.search.engine.search``) on a table the real index job published, for each
  hybrid × re-rank mode, restricted to the test split as the demo is.

Intervals are percentile bootstraps over queries (AUCs: over products), and "B minus A" figures
resample the same queries for both methods (:mod:`blip_ops.metrics`), which is what decides whether
a difference is real. Library code with no command line: ``benchmarks/bench_quality.py`` calls it.
Each task has a ``*_from_*`` / ``*_report`` part that takes in-memory inputs, for tests.

This module gathers the protocol's entry points; each task lives in its own module
(``task_a``, ``itm_auc``, ``task_b``, ``task_c``) over the shared ``inputs``, ``rankings`` and
``common``.
"""

from pipelines.quality.common import (
    ATTRIBUTES,
    DEPTH,
    LANGS,
    NDCG_AT,
    PRODUCT_COLUMNS,
    QUERY_COLUMNS,
    RECALL_AT,
    SIBLING_AXES,
    TOKEN_CACHE_BYTES,
    Relevance,
)
from pipelines.quality.inputs import catalog_products, catalog_queries
from pipelines.quality.itm_auc import (
    ItmPair,
    itm_auc,
    itm_auc_from_products,
    itm_auc_pairs,
    itm_auc_report,
    score_pairs,
)
from pipelines.quality.rankings import (
    Judgements,
    judge,
    paired_report,
    per_query_metrics,
    ranking_report,
)
from pipelines.quality.task_a import task_a, task_a_report
from pipelines.quality.task_b import rerank_top, task_b, task_b_from_data
from pipelines.quality.task_c import (
    SERVICE_MODES,
    TEST_FILTER,
    Service,
    open_service,
    run_searches,
    task_c,
    task_c_report,
)

__all__ = [
    "ATTRIBUTES",
    "DEPTH",
    "LANGS",
    "NDCG_AT",
    "PRODUCT_COLUMNS",
    "QUERY_COLUMNS",
    "RECALL_AT",
    "SERVICE_MODES",
    "SIBLING_AXES",
    "TEST_FILTER",
    "TOKEN_CACHE_BYTES",
    "ItmPair",
    "Judgements",
    "Relevance",
    "Service",
    "catalog_products",
    "catalog_queries",
    "itm_auc",
    "itm_auc_from_products",
    "itm_auc_pairs",
    "itm_auc_report",
    "judge",
    "open_service",
    "paired_report",
    "per_query_metrics",
    "ranking_report",
    "rerank_top",
    "run_searches",
    "score_pairs",
    "task_a",
    "task_a_report",
    "task_b",
    "task_b_from_data",
    "task_c",
    "task_c_report",
]
