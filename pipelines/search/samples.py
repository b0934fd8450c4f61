"""Sample queries through the running service: the held-out shopper queries of a generated
catalog, sent over HTTP, with which hits are relevant (same kind and every attribute the query
names) and where the labelled product landed."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

LANGS = ("en", "zh", "pinyin")


def sample_queries(catalog: Path, n_products: int) -> list[dict]:
    """The held-out queries (every language) of the first ``n_products`` test products."""
    queries = pq.read_table(catalog / "queries.parquet").to_pylist()
    queries = [q for q in queries if q.get("split", "test") == "test"]
    products = sorted({q["product_id"] for q in queries})[:n_products]
    order = {lang: i for i, lang in enumerate(LANGS)}
    picked = [q for q in queries if q["product_id"] in products]
    return sorted(picked, key=lambda q: (q["product_id"], order.get(q["lang"], 9)))


def catalog_attributes(catalog: Path) -> dict[str, dict]:
    """{product_id: its kind and attributes} from pairs.parquet ({} for an older catalog)."""
    table = pq.read_table(catalog / "pairs.parquet")
    if "kind" not in table.column_names:
        return {}
    return {r["product_id"]: r for r in table.to_pylist()}


def run_samples(
    url: str, queries: list[dict], k: int, attributes: dict[str, dict] | None = None
) -> list[dict]:
    """POST each query to the running service; the response, where the labelled product is, and
    which hits are relevant (same kind and every attribute the query names) when ``attributes``
    holds the products' attributes."""
    import httpx

    from pipelines.catalog.relevance import is_relevant

    attributes = attributes or {}
    shown = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for q in queries:
            resp = client.post("/search", json={"text": q["query"], "k": k})
            resp.raise_for_status()
            body = resp.json()
            ids = [r["product_id"] for r in body["results"]]
            for r in body["results"]:
                product = attributes.get(r["product_id"])
                r["relevant"] = (
                    is_relevant(q, product) if product is not None and q.get("kind") else None
                )
            shown.append(
                {
                    **q,
                    "rank": ids.index(q["product_id"]) + 1 if q["product_id"] in ids else None,
                    "results": body["results"],
                    "timings_ms": body.get("timings_ms"),
                }
            )
    return shown
