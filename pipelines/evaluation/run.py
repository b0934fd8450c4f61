"""One evaluation run: read the inputs, load the model, measure, write every output.

Recall@1/5/10 both ways, ITC alone and ITC→ITM over the top k_test; the re-rank is
``blip_ops.rerank.combine_scores``, the search service's rule. Outputs: ``out`` (JSON: every
figure, model_id, inputs, k_test), ``<stem>.md`` (tables) and ``<stem>_recall_vs_k_test.png``
beside it, plus ``<stem>.config.resolved.yaml``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import write_resolved_config
from pipelines.evaluation.catalog import load_catalog
from pipelines.evaluation.data import EvalData, EvalInputError
from pipelines.evaluation.karpathy import load_karpathy
from pipelines.evaluation.plot import plot_recall_vs_k_test
from pipelines.evaluation.report import markdown_report

if TYPE_CHECKING:
    from pipelines.config import AppConfig

DEFAULT_K_TEST = (1, 4, 16, 32, 64, 128, 256)


def run_evaluation(
    cfg: AppConfig,
    out: Path,
    *,
    catalog: str | None = None,
    karpathy: str | None = None,
    images_dir: str | None = None,
    k_test: Sequence[int] = DEFAULT_K_TEST,
    split: str = "test",
    texts: str = "queries",
    batch_size: int | None = None,
    token_cache_mb: float = 2048,
) -> dict:
    """Evaluate ``model.name_or_path`` on a catalog split (default: the folder above
    ``source.uri``) or a Karpathy annotation; returns the results the JSON holds."""
    from blip_ops import load_model
    from blip_ops.evaluate import evaluate_model, recall_vs_k_test
    from blip_ops.quantize import quantization_of
    from pipelines.runtime.inputs import ensure_model

    started = time.perf_counter()
    # Inputs first: a wrong path should fail before a model loads.
    data = _read_inputs(cfg, catalog, karpathy, images_dir, split, texts)
    model = load_model(ensure_model(cfg.model.name_or_path), **cfg.model.query_load_args())
    if karpathy is None:
        # Catalog images are decoded as the index job decodes them (JPEG drafted to model size).
        data.images.target_size = model.image_settings.size
    n_cands = max(len(data.product_ids), len(data.texts))
    ks = sorted({min(int(k), n_cands) for k in k_test})
    metrics = evaluate_model(
        model, data.images, data.texts, data.text_product, languages=data.languages, k_test=ks,
        batch_size=batch_size or cfg.encode.batch_size, token_cache_mb=token_cache_mb,
    )  # fmt: skip
    results = {
        "model": cfg.model.name_or_path,
        "model_id": model.model_id,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": quantization_of(model),
        "inputs": data.inputs,
        "k_test": ks,
        "k_test_requested": [int(k) for k in k_test],
        "metrics": metrics,
        "recall_vs_k_test": recall_vs_k_test(metrics) if ks else None,
        "outputs": output_paths(out),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_outputs(results, cfg, out)
    return results


def _read_inputs(
    cfg: AppConfig,
    catalog: str | None,
    karpathy: str | None,
    images_dir: str | None,
    split: str,
    texts: str,
) -> EvalData:
    if karpathy is not None:
        if images_dir is None:
            raise EvalInputError(
                "--karpathy needs --images DIR (the folder its image paths are relative to)"
            )
        return load_karpathy(karpathy, images_dir)
    return load_catalog(catalog or default_catalog(cfg), split, cfg, target_size=None, texts=texts)


def default_catalog(cfg: AppConfig) -> str:
    """``source.uri``: the catalog the index job reads; for a demo catalog's ``products/`` the
    folder above it, where its queries are."""
    uri = cfg.source.uri.rstrip("/")
    return uri.removesuffix("/products") if uri.endswith("/products") else uri


def output_paths(out: Path) -> dict[str, str]:
    """The files of a run whose JSON is ``out``: markdown, plot and config beside it."""
    stem = out.with_suffix("")
    return {
        "json": str(out),
        "markdown": str(stem.with_suffix(".md")),
        "plot": str(stem.parent / f"{stem.name}_recall_vs_k_test.png"),
        "config": str(stem.parent / f"{stem.name}.config.resolved.yaml"),
    }


def write_outputs(results: dict, cfg: AppConfig, out: Path) -> None:
    """Markdown, plot (only with a k_test: it has no x axis otherwise), config, JSON last."""
    outputs = results["outputs"]
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(outputs["markdown"]).write_text(markdown_report(results), encoding="utf-8")
    if results["k_test"]:
        plot_recall_vs_k_test(
            results["recall_vs_k_test"], Path(outputs["plot"]),
            f"{results['model_id']}: recall vs k_test ({results['inputs']['kind']}; "
            "ITC = no re-rank)",
        )  # fmt: skip
    else:
        del outputs["plot"]
    write_resolved_config(cfg, out.parent, name=Path(outputs["config"]).name)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
