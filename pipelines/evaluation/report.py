"""The evaluation's tables: markdown beside the JSON, and the same cells for the console."""

from __future__ import annotations

import json

DIRECTION_SHORT = {"text_to_product": "text→product", "product_to_text": "product→text"}


def fmt(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def method_rows(metrics: dict) -> list[tuple[str, dict]]:
    rows = [("ITC", metrics["itc"])]
    rows += [(f"ITC→ITM k_test={k}", fig) for k, fig in metrics.get("itm", {}).items()]
    return rows


def table_cells(fig: dict) -> list[str]:
    cells = [fmt(v) for d in ("text_to_product", "product_to_text") for v in fig[d].values()]
    return [*cells, fmt(fig["mean"])]


def markdown_report(results: dict) -> str:
    m = results["metrics"]
    names = list(m["itc"]["text_to_product"])
    head = [f"T→P {n}" for n in names] + [f"P→T {n}" for n in names] + ["mean"]
    lines = [
        f"# Retrieval evaluation: {results['model']}",
        "",
        f"- model_id: `{results['model_id']}`",
        f"- inputs: {json.dumps(results['inputs'], ensure_ascii=False)}",
        f"- products (images): {m['counts']['products']}, texts: {m['counts']['texts']}, "
        f"products with texts: {m['counts']['products_with_texts']}",
        "- T→P: text→product (image retrieval, IR); P→T: product→text (text retrieval, TR; a "
        "hit when any of the product's texts is in the top K). Recall in %.",
        f"- ITC→ITM: top k_test by cosine re-scored with ITM logit + ITC cosine ({m['itm_pairs']} "
        "pairs scored)",
        "",
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    lines += [f"| {name} | " + " | ".join(table_cells(fig)) + " |" for name, fig in method_rows(m)]
    if m.get("by_lang"):
        k = str(max(m["k_test"])) if m.get("k_test") else None
        lines += ["", f"## Per query language (ITC, and ITC→ITM at k_test={k})" if k else
                  "## Per query language (ITC)", ""]  # fmt: skip
        lines += ["| language | texts | method | " + " | ".join(head) + " |",
                  "|---|---:|---|" + "---:|" * len(head)]  # fmt: skip
        for lang, block in m["by_lang"].items():
            n = block["counts"]["texts"]
            lines.append(f"| {lang} | {n} | ITC | " + " | ".join(table_cells(block["itc"])) + " |")
            if k:
                lines.append(
                    f"| {lang} | {n} | ITC→ITM | " + " | ".join(table_cells(block["itm"][k])) + " |"
                )
    return "\n".join(lines) + "\n"
