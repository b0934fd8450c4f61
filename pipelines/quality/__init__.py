"""Search-quality evaluation as library code (tasks A, B, C and the ITM diagnostics).

See :mod:`pipelines.quality.tasks` for what each task measures and why; ``benchmarks/bench_quality.py``
runs them and writes the figures.
"""

from pipelines.quality.tasks import (
    Service,
    catalog_products,
    catalog_queries,
    itm_auc,
    itm_auc_from_products,
    open_service,
    task_a,
    task_a_report,
    task_b,
    task_b_from_data,
    task_c,
    task_c_report,
)

__all__ = [
    "Service",
    "catalog_products",
    "catalog_queries",
    "itm_auc",
    "itm_auc_from_products",
    "open_service",
    "task_a",
    "task_a_report",
    "task_b",
    "task_b_from_data",
    "task_c",
    "task_c_report",
]
