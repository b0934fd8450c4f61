"""`make demo`: the whole path on one screen, offline.

    python -m pipelines.demo --config configs/local.yaml [key=value ...] [--model PATH]

Builds the tiny offline BLIP when the configured one is the local default and absent, renders a
handful of product photos with titles in English, Chinese characters and pinyin, decodes them with
the safe decoder, encodes images and titles through ``blip_ops``, and prints, for sample queries in
the three scripts, the brute-force ITC ranking and its ITM re-rank. Later issues grow this into
catalog → index job → search service.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.config import (
    DEFAULT_DATA_DIR,
    AppConfig,
    ConfigError,
    add_config_arguments,
    config_from_args,
    write_resolved_config,
)

logger = logging.getLogger(__name__)

CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")  # Debian fonts-wqy-microhei

# (kind, colour name, RGB, English title, Chinese title, pinyin title)
PRODUCTS = [
    (
        "sofa",
        "red",
        (200, 30, 40),
        "M & D Simple Modern Light Luxury Red Sofa TE04",
        "简约现代轻奢红色沙发 TE04",
        "jian yue xian dai qing she hong se sha fa TE04",
    ),
    (
        "sofa",
        "grey",
        (128, 128, 128),
        "M & D Simple Modern Grey Linen Sofa TE05",
        "简约现代灰色布艺沙发 TE05",
        "jian yue xian dai hui se bu yi sha fa TE05",
    ),
    (
        "lamp",
        "yellow",
        (240, 200, 30),
        "Nordic Yellow Desk Lamp LED Eye Care",
        "北欧黄色台灯 护眼",
        "bei ou huang se tai deng hu yan",
    ),
    (
        "bag",
        "black",
        (25, 25, 25),
        "Genuine Leather Black Handbag Women Large",
        "真皮黑色女士手提包",
        "zhen pi hei se nv shi shou ti bao",
    ),
    (
        "kettle",
        "silver",
        (190, 190, 200),
        "Stainless Steel Electric Kettle 1.7L Silver",
        "不锈钢电热水壶 1.7L 银色",
        "bu xiu gang dian re shui hu 1.7L yin se",
    ),
    (
        "scooter",
        "blue",
        (30, 80, 200),
        "Kids Balance Scooter Anti-rollover Blue 1-3 Years",
        "儿童滑行车 防侧翻 蓝色 1-3岁",
        "er tong hua xing che fang ce fan lan se 1-3 sui",
    ),
    (
        "shirt",
        "green",
        (40, 160, 60),
        "Men Cotton Striped Shirt Green Slim Fit",
        "男士纯棉条纹衬衫 绿色",
        "nan shi chun mian tiao wen chen shan lv se",
    ),
    (
        "chair",
        "brown",
        (120, 70, 30),
        "Solid Wood Dining Chair Brown Walnut",
        "实木餐椅 胡桃色",
        "shi mu can yi hu tao se",
    ),
]
QUERIES = [
    ("en", "red sofa"),
    ("zh", "红色沙发"),
    ("pinyin", "hong se sha fa"),
    ("en", "kids scooter"),
]


@dataclass
class DemoProduct:
    product_id: str
    title: str
    title_lang: str
    image: bytes  # JPEG bytes, as a catalog row would carry them


def _font(size: int):
    if CJK_FONT.is_file():
        return ImageFont.truetype(str(CJK_FONT), size)
    return ImageFont.load_default(size)


def render_product(kind: str, rgb: tuple[int, int, int], brand: str, size: int = 480) -> bytes:
    """A recognisable product shot: white backdrop, the object's silhouette in its colour, brand text."""
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    s = size
    if kind in ("sofa", "chair"):
        d.rectangle((s * 0.15, s * 0.45, s * 0.85, s * 0.7), fill=rgb)
        d.rectangle(
            (s * 0.15, s * 0.25, s * 0.85 if kind == "sofa" else s * 0.35, s * 0.47), fill=rgb
        )
        d.rectangle((s * 0.18, s * 0.7, s * 0.24, s * 0.85), fill=(60, 40, 20))
        d.rectangle((s * 0.76, s * 0.7, s * 0.82, s * 0.85), fill=(60, 40, 20))
    elif kind == "lamp":
        d.polygon(
            [(s * 0.3, s * 0.45), (s * 0.7, s * 0.45), (s * 0.6, s * 0.2), (s * 0.4, s * 0.2)],
            fill=rgb,
        )
        d.rectangle((s * 0.48, s * 0.45, s * 0.52, s * 0.8), fill=(80, 80, 80))
        d.ellipse((s * 0.35, s * 0.78, s * 0.65, s * 0.86), fill=(80, 80, 80))
    elif kind == "bag":
        d.rounded_rectangle((s * 0.2, s * 0.4, s * 0.8, s * 0.8), radius=s // 20, fill=rgb)
        d.arc((s * 0.35, s * 0.2, s * 0.65, s * 0.55), 180, 360, fill=rgb, width=s // 30)
    elif kind == "kettle":
        d.ellipse((s * 0.25, s * 0.3, s * 0.75, s * 0.85), fill=rgb)
        d.polygon([(s * 0.72, s * 0.45), (s * 0.9, s * 0.35), (s * 0.75, s * 0.55)], fill=rgb)
    elif kind == "scooter":
        d.line((s * 0.25, s * 0.7, s * 0.75, s * 0.7), fill=rgb, width=s // 25)
        d.line((s * 0.7, s * 0.7, s * 0.65, s * 0.25), fill=rgb, width=s // 30)
        for cx in (0.25, 0.75):
            d.ellipse((s * (cx - 0.08), s * 0.68, s * (cx + 0.08), s * 0.84), fill=(30, 30, 30))
    else:  # shirt
        d.polygon(
            [
                (s * 0.3, s * 0.25),
                (s * 0.7, s * 0.25),
                (s * 0.85, s * 0.4),
                (s * 0.72, s * 0.48),
                (s * 0.7, s * 0.85),
                (s * 0.3, s * 0.85),
                (s * 0.28, s * 0.48),
                (s * 0.15, s * 0.4),
            ],
            fill=rgb,
        )
        for y in range(int(s * 0.3), int(s * 0.85), s // 16):
            d.line((s * 0.3, y, s * 0.7, y), fill=(255, 255, 255), width=3)
    d.text((s * 0.05, s * 0.05), brand, fill=(20, 20, 20), font=_font(s // 14))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def demo_catalog() -> list[DemoProduct]:
    """One listing per product, its language rotating through English, 汉字 and pinyin."""
    langs = ("en", "zh", "pinyin")
    out = []
    for i, (kind, _colour, rgb, en, zh, py) in enumerate(PRODUCTS):
        lang = langs[i % 3]
        title = {"en": en, "zh": zh, "pinyin": py}[lang]
        brand = "优品 UPIN" if lang == "zh" else "UPIN"
        out.append(DemoProduct(f"demo-{i:03d}", title, lang, render_product(kind, rgb, brand)))
    return out


def ensure_model(cfg: AppConfig) -> str:
    """The configured model; builds the tiny one when it is the local default and missing."""
    ref = cfg.model.name_or_path
    path = Path(ref)
    if path.is_absolute() and not path.exists() and DEFAULT_DATA_DIR / "models" in path.parents:
        from blip_ops.tiny_model import write_tiny_model

        print(f"building the tiny offline BLIP at {path} ...")
        write_tiny_model(path)
    return ref


def run_demo(cfg: AppConfig, out_dir: Path | None = None) -> dict:
    from blip_ops import decode_batch, load_model, rerank

    started = time.perf_counter()
    model = load_model(
        ensure_model(cfg),
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        attention=cfg.model.attention,
    )
    products = demo_catalog()
    decoded = decode_batch(
        [p.image for p in products],
        target_size=model.image_settings.size,
        max_bytes=cfg.source.max_image_bytes,
        device=str(model.device),
    )
    failed = [
        (p.product_id, e.reason)
        for p, e in zip(products, decoded.errors, strict=True)
        if e is not None
    ]
    if failed:
        raise RuntimeError(f"demo images failed to decode: {failed}")
    pixels = model.preprocess(decoded.images)
    image_emb = model.encode_images(pixels).embeddings.numpy()  # (P, D)
    title_emb = model.encode_texts([p.title for p in products]).numpy()  # (P, D)
    k = min(cfg.serve.k, len(products), 5)
    rerank_k = min(cfg.serve.rerank_k, len(products))
    results = []
    for lang, query in QUERIES:
        q = model.encode_texts([query]).numpy()[0]
        itc = image_emb @ q  # (P,) brute force: exact cosine against every product image
        ann = np.argsort(-itc, kind="stable")
        ranked = rerank(model, query, itc[ann], images=pixels[ann], rerank_k=rerank_k, k=k)
        rows = [
            {
                "rank": r + 1,
                "product_id": products[ann[i]].product_id,
                "title": products[ann[i]].title,
                "itc_score": round(float(ranked.itc[r]), 4),
                "itm_score": None if np.isnan(ranked.itm[r]) else round(float(ranked.itm[r]), 4),
                "score": round(float(ranked.score[r]), 4),
            }
            for r, i in enumerate(ranked.order)
        ]
        results.append(
            {
                "lang": lang,
                "query": query,
                "normalised": model.normalize_text(query),
                "results": rows,
            }
        )
    summary = {
        "model": cfg.model.name_or_path,
        "model_id": model.model_id,
        "products": len(products),
        "title_title_cosine_mean": float(
            (title_emb @ title_emb.T)[~np.eye(len(products), dtype=bool)].mean()
        ),
        "queries": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo_results.json").write_text(
            json.dumps(summary, indent=2, ensure_ascii=False)
        )
        write_resolved_config(cfg, out_dir)
    return summary


def print_summary(summary: dict, out_dir: Path | None) -> None:
    print(f"\nmodel {summary['model']} ({summary['model_id']}), {summary['products']} products")
    for q in summary["queries"]:
        print(f"\nquery [{q['lang']}] {q['query']!r} -> normalised {q['normalised']!r}")
        print(f"  {'#':>2}  {'product':<9} {'itc':>7} {'itm':>7} {'score':>7}  title")
        for r in q["results"]:
            itm = "-" if r["itm_score"] is None else f"{r['itm_score']:7.3f}"
            print(
                f"  {r['rank']:>2}  {r['product_id']:<9} {r['itc_score']:7.3f} {itm:>7} {r['score']:7.3f}  {r['title']}"
            )
    print(
        f"\ndone in {summary['seconds']}s"
        + (f"; results and resolved config in {out_dir}" if out_dir else "")
    )
    if "tiny" in summary["model"]:
        print(
            "note: the tiny model has random weights, so these rankings show the mechanics, not quality."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo", description=__doc__.splitlines()[0]
    )
    add_config_arguments(parser, ("model",))
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from blip_ops.hub import ModelUnavailableError

    out_dir = Path(cfg.output.dir) / "demo" if cfg.output.dir else None
    try:
        summary = run_demo(cfg, out_dir)
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
