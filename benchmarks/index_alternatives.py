"""What ``benchmarks/bench_index.py`` sets the index job against, besides the model alone: the
naive loop a user would write first (its part 3) and the decode options at each model size (its
part 5). bench_index.py's docstring says what each measures; it runs these in fresh processes.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger("bench_index")


# ---- 3. naive baseline ---------------------------------------------------------------------------
def naive_baseline(model_dir: Path, catalog: Path, batch_size: int, workdir: Path) -> dict:
    """The plain transformers loop (see the module docstring)."""
    import lancedb
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import (
        AutoTokenizer,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    t_load = time.perf_counter()
    model = BlipForImageTextRetrieval.from_pretrained(str(model_dir)).eval()
    try:
        processor = BlipProcessor.from_pretrained(str(model_dir))
        processor_source = "BlipProcessor.from_pretrained"
    except (OSError, ValueError, TypeError) as err:  # no processor config: build it from parts
        logger.info("BlipProcessor.from_pretrained failed (%s); building it from its parts", err)
        processor = BlipProcessor(
            image_processor=BlipImageProcessor.from_pretrained(str(model_dir)),
            tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        )
        processor_source = "BlipProcessor(BlipImageProcessor, AutoTokenizer)"
    load_s = time.perf_counter() - t_load
    parts = dict.fromkeys(("read", "decode", "processor", "model", "write"), 0.0)
    ids: list[str] = []
    embs: list[np.ndarray] = []
    failed = 0
    t_start = time.perf_counter()
    for path in sorted((catalog / "products").glob("*.parquet")):
        t = time.perf_counter()
        table = pq.read_table(path, columns=["product_id", "image"])
        parts["read"] += time.perf_counter() - t
        pids, blobs = table.column("product_id").to_pylist(), table.column("image").to_pylist()
        for start in range(0, len(pids), batch_size):
            t = time.perf_counter()
            images, batch_ids = [], []
            for pid, blob in zip(
                pids[start : start + batch_size], blobs[start : start + batch_size], strict=True
            ):
                try:
                    images.append(Image.open(io.BytesIO(blob)).convert("RGB"))
                    batch_ids.append(pid)
                except Exception:  # noqa: BLE001 - the naive loop just skips what PIL refuses
                    failed += 1
            parts["decode"] += time.perf_counter() - t
            if not images:
                continue
            t = time.perf_counter()
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            parts["processor"] += time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                cls = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0, :]
                emb = F.normalize(model.vision_proj(cls), dim=-1)
            parts["model"] += time.perf_counter() - t
            ids.extend(batch_ids)
            embs.append(emb.numpy())
    t = time.perf_counter()
    vectors = np.concatenate(embs).astype(np.float32)
    db = lancedb.connect(str(workdir / "naive-lancedb"))
    db.create_table(
        "products",
        data=pa.table(
            {
                "product_id": pa.array(ids, pa.string()),
                "image_embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors.reshape(-1)), vectors.shape[1]
                ),
            }
        ),
        mode="overwrite",
    )
    parts["write"] += time.perf_counter() - t
    total = time.perf_counter() - t_start
    shutil.rmtree(workdir / "naive-lancedb", ignore_errors=True)
    return {
        "images": len(ids),
        "failed": failed,
        "processor": processor_source,
        "attention": "eager (transformers as shipped)",
        "load_s": round(load_s, 2),
        "seconds": round(total, 2),
        "images_per_s": round(len(ids) / total, 2),
        "ms_per_image": {k: round(v / max(1, len(ids)) * 1000, 3) for k, v in parts.items()},
    }


# ---- 5. decode options ---------------------------------------------------------------------------
def decode_options(catalog: Path, sizes: list[int], sample: int) -> dict:
    from PIL import Image

    from blip_ops.decode import decode_image, sniff_format

    first = sorted((catalog / "products").glob("*.parquet"))[0]
    blobs = pq.read_table(first, columns=["image"]).column("image").to_pylist()[:sample]
    formats: dict[str, int] = {}
    for b in blobs:
        fmt = sniff_format(b) or "?"
        formats[fmt] = formats.get(fmt, 0) + 1
    bicubic = Image.Resampling.BICUBIC

    def pil_plain(b, s):
        return Image.open(io.BytesIO(b)).convert("RGB").resize((s, s), bicubic)

    def pil_draft(b, s):
        im = Image.open(io.BytesIO(b))
        if im.format == "JPEG":
            im.draft("RGB", (s, s))
        return im.convert("RGB").resize((s, s), bicubic)

    def safe_full(b, s):
        return decode_image(b).resize((s, s), bicubic)

    def safe_draft(b, s):  # what the job does (EncodeBatch + preprocess)
        return decode_image(b, target_size=s).resize((s, s), bicubic)

    options = {
        "PIL plain": pil_plain,
        "PIL + draft": pil_draft,
        "blip_ops decode_image": safe_full,
        "blip_ops decode_image(target_size) [job]": safe_draft,
    }
    sides = sorted({im.size for im in (Image.open(io.BytesIO(b)) for b in blobs[:50])})
    out = {
        "images": len(blobs),
        "formats": formats,
        "source_px": [min(sides), max(sides)],
        "rows": [],
    }
    for s in sizes:
        for name, fn in options.items():
            fn(blobs[0], s)
            t = time.perf_counter()
            for b in blobs:
                fn(b, s)
            dt = time.perf_counter() - t
            out["rows"].append(
                {
                    "option": name,
                    "target_px": s,
                    "images_per_s": round(len(blobs) / dt, 1),
                    "ms_per_image": round(dt / len(blobs) * 1000, 3),
                }
            )
            logger.info("decode %s @%d: %.1f images/s", name, s, len(blobs) / dt)
    # The job's per-image CPU work after decoding, at BLIP-base's size: the stored
    # model-resolution JPEG (384 px) and the 256-px display thumbnail (EncodeBatch._derivatives, on
    # its derivative threads). CPU path: the JPEG of the model's own resize (that resize is the
    # model's preprocessing, counted there) and the thumbnail resized from the draft-decoded image.
    # GPU path: both images are resized on the GPU where nvJPEG decoded them (RetrievalModel.resize,
    # stages._thumbnail_source), so the CPU only JPEG-encodes them.
    from pipelines.indexing.derivatives import model_resolution_jpeg, thumbnail_jpeg, thumbnail_size

    decoded = [decode_image(b, target_size=384) for b in blobs]
    model_in = [im.convert("RGB").resize((384, 384), Image.Resampling.BICUBIC) for im in decoded]
    small = [
        im.resize(thumbnail_size(im.width, im.height, 256), Image.Resampling.BICUBIC)
        for im in decoded
    ]
    for key, thumbs, what in (
        (
            "derivatives_384",
            decoded,
            "CPU path: JPEG of the 384-px model input + thumbnail_jpeg(256) "
            "of the draft-decoded image",
        ),
        (
            "derivatives_384_gpu_path",
            small,
            "GPU path: JPEG encodes only (both resizes on the GPU)",
        ),
    ):
        t = time.perf_counter()
        for im, th in zip(model_in, thumbs, strict=True):
            model_resolution_jpeg(im, 384)
            thumbnail_jpeg(th, 256)
        dt = time.perf_counter() - t
        out[key] = {"ms_per_image": round(dt / len(decoded) * 1000, 3), "what": what}
    return out
