"""Fine-tuning and evaluation on any catalog in the contract, not only the demo catalog's layout.

A merchant's catalog on S3: its own column names, two title columns, images by ``image_uri``
(relative to the catalog folder and absolute ``s3://``), no split column (a hash of a group column
splits it), no pairs.parquet and no queries file (its titles are the queries).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import evaluate, finetune
from pipelines.catalog.reader import CatalogInputError, CatalogReader
from pipelines.catalog.splitting import hash_splits
from pipelines.config import load_config
from tests.conftest import draw_product, encode_image_bytes

README = Path(__file__).resolve().parents[1] / "README.md"
N_GROUPS = 16  # two products per group: a group never straddles two splits


def test_hash_split_is_deterministic_follows_the_shares_and_keeps_groups_together():
    values = [f"sku-{i}" for i in range(20_000)]
    shares = {"train": 0.7, "val": 0.1, "test": 0.2}
    first = hash_splits(values, shares)
    assert first == hash_splits(values, shares)  # the same in every run (no salted hash())
    counts = Counter(first)
    for name, share in shares.items():
        assert abs(counts[name] / len(values) - share) < 0.015, counts
    # A value's split does not depend on the other values: adding products moves none.
    assert hash_splits(values[:100], shares) == first[:100]
    assert set(hash_splits(["fam-1"] * 5, shares)) == {hash_splits(["fam-1"], shares)[0]}
    assert set(hash_splits(values, {"train": 1.0})) == {"train"}


def _merchant_catalog(bucket: str, s3_server: str) -> tuple[str, list[dict]]:
    """30-odd products under s3://bucket/shop/catalog/, images beside it and under images/."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    colours = ["red", "blue", "green", "black"]
    rows = []
    for i in range(2 * N_GROUPS):
        key = f"shop/images/{i:03d}.jpg" if i % 2 else f"shop/catalog/photos/{i:03d}.jpg"
        data = encode_image_bytes(draw_product(i))
        client.put_object(Bucket=bucket, Key=key, Body=data)
        rows.append(
            {
                "sku": f"S{i:04d}",
                "name": f"{colours[i % 4]} desk lamp model {i}",
                "name_zh": f"{colours[i % 4]} 台灯 {i}" if i % 3 else None,  # some have one title
                "photo": f"s3://{bucket}/{key}" if i % 2 else f"photos/{i:03d}.jpg",
                "group": f"g{i // 2}",
            }
        )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    client.put_object(Bucket=bucket, Key="shop/catalog/part-0.parquet", Body=buf.getvalue())
    return f"s3://{bucket}/shop/catalog", rows


def _readme_config(tmp_path: Path, bucket: str) -> Path:
    """The README's own-catalog config, with the test bucket for ``my-bucket``."""
    text = README.read_text(encoding="utf-8").split("<!-- test: own-catalog-config -->", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "configs" / "my_shop.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.replace("s3://my-bucket/", f"s3://{bucket}/shop/"), encoding="utf-8")
    return path


def _test_server(s3_server: str) -> list[str]:
    """What only the test changes: its S3 server and region."""
    return [f"s3.endpoint_url={s3_server}", "s3.allow_http=true", "s3.region=us-east-1"]


def test_the_readme_config_fine_tunes_and_evaluates_a_merchant_catalog_on_s3(
    tiny_model_dir, s3_server, s3_bucket, tmp_path, capsys
):
    catalog, rows = _merchant_catalog(s3_bucket, s3_server)
    config = _readme_config(tmp_path, s3_bucket)
    cfg = load_config(config, _test_server(s3_server))
    assert cfg.finetune.catalog.rstrip("/") == catalog and cfg.source.uri.rstrip("/") == catalog
    splits = CatalogReader(catalog, cfg).splits()
    groups = [r["group"] for r in rows]
    hashed = hash_splits(groups, cfg.source.split_fractions)
    assert splits == dict(zip([r["sku"] for r in rows], hashed, strict=True))
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(splits[r["sku"]])
    assert all(len(s) == 1 for s in by_group.values())  # groups stay whole
    counts = Counter(splits.values())
    assert counts["train"] >= 4 and counts["val"] >= 1 and counts["test"] >= 1, counts

    out_dir = tmp_path / ".data" / "finetune" / "my-shop"  # the README's out_dir
    code = finetune.main([
        "--config", str(config), *_test_server(s3_server), f"model.name_or_path={tiny_model_dir}",
        "model.device=cpu", "finetune.steps=2", "finetune.eval_every=1", "finetune.batch_size=4",
        "finetune.eval_k_test=2",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["train_products"] == counts["train"]
    assert [h["step"] for h in summary["history"]] == [1, 2]  # val evaluated at each step

    out = tmp_path / "eval.json"
    code = evaluate.main([
        "--config", str(config), *_test_server(s3_server), "--model", str(out_dir / "best"),
        "model.device=cpu", "--k-test", "2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    inputs = results["inputs"]
    test_rows = [r for r in rows if splits[r["sku"]] == "test"]
    titles = sum(1 + bool(r["name_zh"]) for r in test_rows)
    assert inputs["catalog"].rstrip("/") == catalog and inputs["split"] == "test"
    assert inputs["texts"] == "titles"  # no queries file: the titles are the queries
    assert inputs["products"] == len(test_rows) and inputs["queries"] == titles
    assert inputs["split_rule"].startswith("hash of 'group'")
    assert set(results["metrics"]["by_lang"]) == {"name", "name_zh"}  # one per title column


def test_a_catalog_without_the_named_columns_says_which(s3_server, s3_bucket, tmp_path):
    catalog, _ = _merchant_catalog(s3_bucket, s3_server)
    config = _readme_config(tmp_path, s3_bucket)
    cfg = load_config(config, [*_test_server(s3_server), "source.title_columns=[name,title_fr]"])
    with pytest.raises(CatalogInputError, match=r"title columns .*\['title_fr'\] not found"):
        CatalogReader(catalog, cfg).title_rows("train")
    cfg = load_config(config, [*_test_server(s3_server), "source.split_by=family"])
    with pytest.raises(CatalogInputError, match="no column 'family' to split by"):
        CatalogReader(catalog, cfg).splits()
