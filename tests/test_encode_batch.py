"""EncodeBatch, the index job's encoder stage, called directly (no Ray): one resize serves the
model and the stored model-resolution JPEG, the stored JPEGs are made on a thread pool while the
model encodes, and GPU-decoded tensors are resized where they lie."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from blip_ops.decode import decode_image
from pipelines.config import EncodeConfig
from pipelines.indexing.derivatives import model_resolution_jpeg, thumbnail_jpeg, thumbnail_size
from pipelines.indexing.stages import (
    DETAIL,
    PEAK_RSS,
    REASON,
    STATUS,
    EncodeBatch,
    _thumbnail_source,
)
from pipelines.storage import S3Settings
from tests.conftest import draw_product, encode_image_bytes

SIZES = [(120, 90), (300, 420), (512, 512), (64, 64), (40, 300), (700, 500)]


def _batch(blobs: list[bytes], statuses: list[str] | None = None) -> pa.Table:
    n = len(blobs)
    return pa.table(
        {
            "product_id": [f"p{i}" for i in range(n)],
            "title": [f"Red  Shoe {i}" for i in range(n)],
            "image": pa.array(blobs, pa.binary()),
            "image_uri": pa.array([None] * n, pa.string()),
            STATUS: statuses or ["encode"] * n,
            REASON: pa.array([None] * n, pa.string()),
            DETAIL: pa.array([None] * n, pa.string()),
        }
    )


def _encoder(model_dir, **kw) -> EncodeBatch:
    args = {
        "model": str(model_dir),
        "device": "cpu",
        "dtype": "float32",
        "attention": "sdpa",
        "thumbnail_size": 256,
        "source_uri": "/nonexistent",
        "s3": S3Settings(),
        "max_image_bytes": 10_000_000,
    }
    return EncodeBatch(**(args | kw))


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [encode_image_bytes(draw_product(i, size)) for i, size in enumerate(SIZES)]


@pytest.mark.parametrize("thumb", [256, 48])  # finer than the 64-px model (second decode), coarser
def test_threads_store_the_same_rows_as_the_actor_thread(tiny_model_dir, blobs, thumb):
    bad = b"\xff\xd8 not a jpeg"
    batch = _batch([*blobs, bad], ["encode"] * len(blobs) + ["encode"])
    serial = _encoder(tiny_model_dir, thumbnail_size=thumb, derivative_threads=0)(batch)
    pooled = _encoder(tiny_model_dir, thumbnail_size=thumb, derivative_threads=3)(batch)
    drop = ["indexed_at", PEAK_RSS]
    assert serial.drop_columns(drop).equals(pooled.drop_columns(drop))
    status = pooled.column(STATUS).to_pylist()
    assert status == ["indexed"] * len(blobs) + ["rejected"], pooled.column(REASON).to_pylist()
    assert pooled.column("model_image").to_pylist()[-1] is None  # the bad row has no images
    for data, row in zip(blobs, pooled.to_pylist(), strict=False):
        with Image.open(io.BytesIO(data)) as src:
            want = thumbnail_size(src.width, src.height, thumb)
        with Image.open(io.BytesIO(row["thumbnail"])) as th:
            assert th.format == "JPEG" and th.size == want


def test_one_resize_stores_the_bytes_the_old_two_resizes_stored(tiny_model_dir, blobs):
    """The model-resolution JPEG is made from the model's own resize: the same bytes as resizing
    the decoded image again (what EncodeBatch did before), and the pixels the model encoded."""
    enc = _encoder(tiny_model_dir)
    size = enc.model.image_settings.size
    out = enc(_batch(blobs)).to_pylist()
    for data, row in zip(blobs, out, strict=True):
        decoded = decode_image(data, target_size=size)
        assert row["model_image"] == model_resolution_jpeg(decoded, size)
        (resized,) = enc.model.resize([decoded])
        stored = np.asarray(Image.open(io.BytesIO(row["model_image"])).convert("RGB"), float)
        assert np.abs(stored - np.asarray(resized, float)).mean() < 6.0  # JPEG loss at 64 px
    emb = np.stack([r["image_embedding"] for r in out])
    want = enc.model.encode_images(
        enc.model.preprocess([decode_image(b, target_size=size) for b in blobs])
    ).embeddings.numpy()
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_resize_then_preprocess_equals_preprocess(tiny_model):
    images = [draw_product(i, s) for i, s in enumerate(SIZES)]
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    resized = tiny_model.resize(images + tensors)
    s = tiny_model.image_settings.size
    assert all(isinstance(r, Image.Image) and r.size == (s, s) for r in resized[: len(images)])
    assert all(r.dtype == torch.uint8 and r.shape == (3, s, s) for r in resized[len(images) :])
    assert tiny_model.resize(resized[:1])[0] is resized[0]  # already at the size: not resized again
    torch.testing.assert_close(
        tiny_model.preprocess(resized), tiny_model.preprocess(images + tensors), atol=0, rtol=0
    )
    with pytest.raises(TypeError, match="image 1: expected an RGB PIL image"):
        tiny_model.resize([images[0], np.zeros((3, 4, 4))])


@pytest.mark.parametrize("size", [(700, 500), (120, 90), (40, 300)])
def test_gpu_decoded_thumbnails_resize_where_they_lie(size):
    """A (3, H, W) tensor (decode_batch's GPU path) is resized as a tensor; only the thumbnail
    comes back as PIL, close to what PIL makes from the same pixels."""
    im = draw_product(7, size)
    tensor = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    shown = _thumbnail_source(tensor, 256)
    assert isinstance(shown, Image.Image) and shown.size == thumbnail_size(*size, 256)
    pil = Image.open(io.BytesIO(thumbnail_jpeg(im, 256))).convert("RGB")
    ours = Image.open(io.BytesIO(thumbnail_jpeg(shown, 256))).convert("RGB")
    assert np.abs(np.asarray(ours, float) - np.asarray(pil, float)).mean() < 4.0
    assert _thumbnail_source(im, 256) is im and _thumbnail_source(b"x", 256) == b"x"


def test_encoder_settings_are_checked():
    assert EncodeConfig().derivative_threads >= 1
    assert EncodeConfig().malloc_mmap_threshold_mb == 32
    with pytest.raises(ValueError, match="malloc_mmap_threshold_mb"):
        EncodeConfig(malloc_mmap_threshold_mb=64)  # glibc's largest mmap threshold is 32 MiB
    with pytest.raises(ValueError, match="derivative_threads"):
        EncodeConfig(derivative_threads=-1)


def test_encoder_actor_sizes_torch_to_its_reservation(tiny_model_dir, ray_local):
    """A CPU encoder actor without ``encode.torch_threads`` runs torch on the CPUs it reserved
    (not the node's cores) with one inter-op thread; with it, on that many."""
    import ray

    @ray.remote
    class Probe:
        def __init__(self, threads):
            self.encoder = _encoder(tiny_model_dir, torch_threads=threads)

        def threads(self):
            import torch

            return torch.get_num_threads(), torch.get_num_interop_threads()

    reserved = Probe.options(num_cpus=1).remote(None)
    explicit = Probe.options(num_cpus=1).remote(2)
    assert ray.get(reserved.threads.remote()) == (1, 1)
    assert ray.get(explicit.threads.remote()) == (2, 1)
    for actor in (reserved, explicit):
        ray.kill(actor)
