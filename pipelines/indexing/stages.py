"""The Ray Data stages of the index job, as plain functions and one callable class.

Nothing here imports Ray: each stage takes and returns pyarrow tables, so unit tests call them
directly and the job wires them with ``map_batches``. Every row carries ``_status``:
``encode`` (new or changed, to be encoded), ``unchanged`` (same content hash and model_id as the
published row), ``staged`` (encoded by an earlier, interrupted run of the same model: saved work),
``rejected`` (with ``_reason`` / ``_detail``) or, after encoding, ``indexed``.

ITM image tokens (``index.store_itm_tokens``) come out of the same vision pass as the row's
embedding, so a row's stored tokens always belong to its content hash and model_id: a changed
product gets new tokens in the run that re-encodes it, and "unchanged" (same hash, same model_id,
whose table is the model's own) covers the tokens too. A setting change alone re-encodes nothing:
unchanged rows keep what their last encoding stored (:func:`note_itm_tokens` logs it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.faults import FaultPlan, encoder_exit_once
from pipelines.indexing.tables import ITM_TOKENS, ITM_TOKENS_SHAPE, rows_without_tokens
from pipelines.indexing.validate import validate_batch
from pipelines.storage import S3Settings, filesystem_for, is_s3

logger = logging.getLogger(__name__)

STATUS, REASON, DETAIL = "_status", "_reason", "_detail"
SOURCE_FILE, ROW_NUMBER = "_source_file", "_row_number"
PEAK_RSS = "_worker_peak_rss_mb"  # memory report of the encoder actor that produced the batch
READ_BATCH_ROWS = 256  # rows per batch read from a Parquet file
TOKEN_MODES = ("auto", "always", "never")  # index.store_itm_tokens


@dataclass(frozen=True)
class Columns:
    """Catalog column names (``source.columns``) and the metadata passed through."""

    product_id: str = "product_id"
    title: str = "title"
    image: str = "image"
    image_uri: str = "image_uri"
    metadata: tuple[str, ...] = ()


# ---- read --------------------------------------------------------------------------------------
def read_files(
    batch: dict, *, source_uri: str, s3: S3Settings, columns: Columns
) -> Iterator[pa.Table]:
    """``map_batches`` UDF over a batch of Parquet file paths: yields their rows in small batches,
    renamed to the canonical columns, with the source file and row number of each row."""
    fs, _ = filesystem_for(source_uri, s3)
    rename = {
        columns.product_id: "product_id",
        columns.title: "title",
        columns.image: "image",
        columns.image_uri: "image_uri",
    }
    for path in batch["path"]:
        path = str(path)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            present = set(parquet.schema_arrow.names)
            wanted = [c for c in (*rename, *columns.metadata) if c in present]
            offset = 0
            for rb in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=wanted):
                table = pa.Table.from_batches([rb]).rename_columns(
                    [rename.get(c, c) for c in rb.schema.names]
                )
                n = table.num_rows
                for name, typ in (
                    ("product_id", pa.string()),
                    ("title", pa.string()),
                    ("image", pa.binary()),
                    ("image_uri", pa.string()),
                ):
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(n, typ))
                table = table.append_column(SOURCE_FILE, pa.array([path] * n, pa.string()))
                table = table.append_column(
                    ROW_NUMBER, pa.array(np.arange(offset, offset + n), pa.int64())
                )
                offset += n
                yield table


# ---- validate ----------------------------------------------------------------------------------
@dataclass
class RunState:
    """What validation needs to know about the whole run (shipped once to every task)."""

    duplicates: frozenset[str] = frozenset()
    published: dict[str, str] = field(
        default_factory=dict
    )  # product_id -> content_hash (same model_id)
    staged: dict[str, str] = field(
        default_factory=dict
    )  # product_id -> content_hash, saved by a crashed run
    max_image_bytes: int = 20_000_000


def validate(batch: pa.Table, *, state: RunState) -> pa.Table:
    """Mark every row encode / unchanged / staged / rejected; drop images of rows not to encode."""
    v = validate_batch(
        batch,
        image_col="image",
        image_uri_col="image_uri",
        duplicates=state.duplicates,
        max_image_bytes=state.max_image_bytes,
    )
    ids = batch.column("product_id").to_pylist()
    status = []
    for pid, reason, h in zip(ids, v.reason, v.content_hash, strict=True):
        if reason is not None:
            status.append("rejected")
        elif state.published.get(pid) == h:
            status.append("unchanged")
        elif state.staged.get(pid) == h:
            status.append("staged")
        else:
            status.append("encode")
    status_arr = pa.array(status, pa.string())
    keep_image = pc.equal(status_arr, "encode")
    out = batch.set_column(
        batch.schema.get_field_index("image"),
        "image",
        pc.if_else(keep_image, batch.column("image"), pa.scalar(None, pa.binary())),
    )
    return (
        out.append_column("content_hash", pa.array(v.content_hash, pa.string()))
        .append_column(STATUS, status_arr)
        .append_column(REASON, pa.array(v.reason, pa.string()))
        .append_column(DETAIL, pa.array(v.detail or [None] * batch.num_rows, pa.string()))
    )


# ---- ITM image tokens ---------------------------------------------------------------------------
def stores_itm_tokens(mode: str, shape: tuple[int, int], max_bytes: int) -> bool:
    """Whether the rows a run encodes store their (N, H) ITM tokens under
    ``index.store_itm_tokens`` = ``mode`` (auto: when they take at most ``max_bytes`` stored)."""
    from blip_ops.token_cache import stored_nbytes

    if mode not in TOKEN_MODES:
        raise ValueError(f"store_itm_tokens must be one of {list(TOKEN_MODES)}, got {mode!r}")
    return mode == "always" or (mode == "auto" and stored_nbytes(shape) <= max_bytes)


def note_itm_tokens(mode: str, max_bytes: int, shape: tuple[int, int], published) -> bool:
    """Decide and log what the run does with ITM tokens (driver, before the stream; the encoder
    actors follow) and, when it stores them, how many published rows have none: unchanged rows
    are not re-encoded for their tokens, so those get tokens only when their content changes.
    Returns whether the run stores them."""
    from blip_ops.token_cache import stored_nbytes

    stored = stores_itm_tokens(mode, shape, max_bytes)
    logger.info(
        "ITM image tokens %dx%d float16 = %d bytes per product: %s (index.store_itm_tokens=%s, "
        "max_stored_token_bytes=%d)", shape[0], shape[1], stored_nbytes(shape),
        "stored" if stored else "not stored (re-rank recomputes them from model_image)",
        mode, max_bytes,
    )  # fmt: skip
    missing = rows_without_tokens(published) if stored and published is not None else 0
    if missing:
        logger.info(
            "%d published rows have no stored ITM tokens (indexed with store_itm_tokens=never, "
            "over max_stored_token_bytes, or before tokens were stored); a setting change alone "
            "re-encodes nothing: they get tokens when their content changes, and their re-rank "
            "recomputes tokens from model_image until then",
            missing,
        )
    return stored


# ---- decode + encode (the actor pool) -------------------------------------------------------------
class EncodeBatch:
    """Callable class for ``map_batches``: loads the model once per actor, then per batch fetches
    referenced images, decodes (GPU JPEG where available), encodes, and makes the table's
    model-resolution image and thumbnail. Decode failures become rejected rows with the decoder's
    reason; rows not marked ``encode`` pass through."""

    def __init__(
        self,
        *,
        model: str,
        device: str,
        dtype: str,
        attention: str,
        thumbnail_size: int,
        source_uri: str,
        s3: S3Settings,
        max_image_bytes: int,
        torch_threads: int | None = None,
        derivative_threads: int = 2,
        malloc_mmap_threshold_mb: int = 32,
        faults: FaultPlan | None = None,  # test hook (pipelines/faults.py); None in production
        store_itm_tokens: bool = True,
    ) -> None:
        from blip_ops import load_model
        from blip_ops.family import resolve_device
        from pipelines.runtime.threads import configure_torch_threads, ray_reserved_cpus

        if malloc_mmap_threshold_mb:
            # Not 1 MiB as in staging and merge: every activation tensor of the vision tower would
            # then be a fresh mmap, page-faulted in on each batch (compact model job: 15.9 vs 32.7
            # images/s, benchmarks/bench_index.py --ablate).
            cap_malloc_retention(malloc_mmap_threshold_mb << 20)
        if resolve_device(device).type == "cpu":
            # torch would size its pool from the node's cores, not from this actor's reservation
            # (0 outside a Ray worker: a caller in this process keeps its own settings).
            threads = torch_threads or ray_reserved_cpus(default=0)
            if threads:
                configure_torch_threads(threads)

        self.model = load_model(model, device=device, dtype=dtype, attention=attention)
        self.thumbnail_size = thumbnail_size
        self.source_uri = source_uri.rstrip("/")
        self.s3 = s3
        self.max_image_bytes = max_image_bytes
        self.dim = self.model.embedding_dim
        self.faults = faults
        # The driver decides it once for the run (:func:`note_itm_tokens`, from the model's token
        # shape and index.store_itm_tokens) and every actor follows.
        self.store_tokens = bool(store_itm_tokens)
        # PIL releases the GIL while it resizes and encodes, so these threads make the stored JPEGs
        # of a batch while torch encodes it, instead of after it on the actor's one thread.
        self._pool = (
            ThreadPoolExecutor(derivative_threads, thread_name_prefix="derivatives")
            if derivative_threads
            else None
        )

    def _fetch(self, uri: str) -> bytes:
        """Bytes of an ``image_uri``: ``s3://…``, an absolute path, or a path relative to the catalog."""
        if not is_s3(uri) and not uri.startswith("/"):
            uri = (
                str(PurePosixPath(self.source_uri) / uri)
                if not is_s3(self.source_uri)
                else f"{self.source_uri}/{uri}"
            )
        fs, path = filesystem_for(uri, self.s3)
        info = fs.get_file_info(path)
        if info.size is not None and info.size > self.max_image_bytes:
            from blip_ops.decode import ImageTooLargeError

            raise ImageTooLargeError(f"{uri} is {info.size} bytes, limit is {self.max_image_bytes}")
        with fs.open_input_stream(path) as f:
            return f.read()

    def derivative_jobs(self, resized: list, images: list, datas: list[bytes]) -> list[tuple]:
        """One job per image for :meth:`_derivatives`: the model-resolution image as PIL and what
        the thumbnail is made from (the decoded image; its bytes when the model's size is smaller
        than the thumbnail, as with the tiny test model, so it is decoded again finer)."""
        display = datas if self.thumbnail_size > self.model.image_settings.size else images
        return [
            (_to_pil(r), _thumbnail_source(d, self.thumbnail_size))
            for r, d in zip(resized, display, strict=True)
        ]

    def _derivatives(self, job: tuple) -> tuple[bytes, bytes]:
        """(model-resolution JPEG, thumbnail JPEG) of one image; runs on the derivative threads."""
        from blip_ops.decode import decode_image
        from pipelines.indexing.derivatives import model_resolution_jpeg, thumbnail_jpeg

        resized, shown = job
        if isinstance(shown, bytes):  # decoded again, finer than the model's size
            shown = decode_image(shown, target_size=self.thumbnail_size)
        return model_resolution_jpeg(resized, resized.width), thumbnail_jpeg(
            shown, self.thumbnail_size
        )

    def _keep_tokens(self, encoded, rows: list[int], tokens: list, shapes: list) -> None:
        """The batch's (k, N, H) ITM tokens into ``tokens`` / ``shapes`` at ``rows``, float16."""
        from blip_ops.token_cache import pack_tokens

        shape = (int(encoded.shape[1]), int(encoded.shape[2]))
        packed = pack_tokens(encoded)
        for i, data in zip(rows, packed, strict=True):
            if data is not None:
                tokens[i], shapes[i] = data, list(shape)
        overflow = sum(data is None for data in packed)
        if overflow:  # not float16-representable: their re-rank recomputes them from model_image
            logger.warning(
                "%d of %d rows: ITM tokens overflow float16, not stored", overflow, len(rows)
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from blip_ops.decode import ImageDecodeError, decode_batch

        encoder_exit_once(self.faults)
        n = batch.num_rows
        status = batch.column(STATUS).to_pylist()
        reason = batch.column(REASON).to_pylist()
        detail = batch.column(DETAIL).to_pylist()
        todo = [i for i, s in enumerate(status) if s == "encode"]
        images = batch.column("image").to_pylist()
        uris = batch.column("image_uri").to_pylist()
        datas: list[bytes] = []
        fetch_errors: dict[int, Exception] = {}
        for i in todo:
            try:
                datas.append(images[i] if images[i] else self._fetch(uris[i]))
            except (OSError, ImageDecodeError) as err:
                fetch_errors[i] = err
                datas.append(b"")
        size = self.model.image_settings.size
        # Decode for the model exactly as blip_ops does (JPEG draft-decoded towards the model's
        # size), so stored embeddings equal blip_ops' for the same bytes.
        decoded = decode_batch(
            datas, target_size=size, max_bytes=self.max_image_bytes, device=str(self.model.device)
        )
        ok_rows, ok_images, ok_datas = [], [], []
        for i, data, im, err in zip(todo, datas, decoded.images, decoded.errors, strict=True):
            if i in fetch_errors:
                err_reason = getattr(fetch_errors[i], "reason", "image_unreadable")
                status[i], reason[i], detail[i] = (
                    "rejected",
                    err_reason,
                    f"{uris[i]}: {fetch_errors[i]}",
                )
            elif err is not None:
                status[i], reason[i], detail[i] = "rejected", err.reason, str(err)
            else:
                ok_rows.append(i)
                ok_images.append(im)
                ok_datas.append(data)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        tokens: list[bytes | None] = [None] * n
        token_shape: list[list[int] | None] = [None] * n
        model_image: list[bytes | None] = [None] * n
        thumbnail: list[bytes | None] = [None] * n
        title_norm: list[str | None] = [None] * n
        if ok_rows:
            # Resized once: the model's input and the stored model-resolution image are the same
            # pixels (on the GPU path, (3, S, S) uint8 tensors resized where they were decoded).
            resized = self.model.resize(ok_images)
            pixels = self.model.preprocess(resized, device=self.model.device)
            jobs = self.derivative_jobs(resized, ok_images, ok_datas)
            made = (
                self._pool.map(self._derivatives, jobs)
                if self._pool is not None
                else None  # made after encoding, on this thread
            )
            encoded = self.model.encode_images(pixels, return_tokens=self.store_tokens)
            emb[ok_rows] = encoded.embeddings.numpy()  # (k, D)
            if encoded.tokens is not None:
                self._keep_tokens(encoded.tokens, ok_rows, tokens, token_shape)
            if made is None:
                made = map(self._derivatives, jobs)
            titles = batch.column("title").to_pylist()
            for i, (model_jpeg, thumb_jpeg) in zip(ok_rows, made, strict=True):
                model_image[i], thumbnail[i] = model_jpeg, thumb_jpeg
                title_norm[i] = self.model.normalize_text(titles[i])
                status[i] = "indexed"
        out = batch.drop_columns(["image", "image_uri", STATUS, REASON, DETAIL])
        flat = pa.array(emb.reshape(-1), pa.float32())
        now = datetime.now(timezone.utc)
        return (
            out.append_column("title_normalized", pa.array(title_norm, pa.string()))
            .append_column("image_embedding", pa.FixedSizeListArray.from_arrays(flat, self.dim))
            .append_column("model_image", pa.array(model_image, pa.binary()))
            .append_column("thumbnail", pa.array(thumbnail, pa.binary()))
            .append_column("model_id", pa.array([self.model.model_id] * n, pa.string()))
            .append_column("indexed_at", pa.array([now] * n, pa.timestamp("us", tz="UTC")))
            .append_column(ITM_TOKENS, pa.array(tokens, pa.binary()))
            .append_column(ITM_TOKENS_SHAPE, pa.array(token_shape, pa.list_(pa.int32(), 2)))
            .append_column(STATUS, pa.array(status, pa.string()))
            .append_column(REASON, pa.array(reason, pa.string()))
            .append_column(DETAIL, pa.array(detail, pa.string()))
            .append_column(PEAK_RSS, pa.array([peak_rss_mb()] * n, pa.float32()))
        )


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def cap_malloc_retention(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more from mmap, so freeing them returns the
    memory to the OS. glibc otherwise raises its mmap threshold after the first large free (up to
    32 MiB) and keeps later large buffers in its per-thread arenas; with the many threads of Lance,
    Arrow, torch and Ray, freed Parquet row groups, image batches and Lance pages then stay resident
    and the process's RSS climbs with the work done, not with what it holds (measured: scanning 570
    MB of staged rows left 300-420 MB resident; with this, 75 MB). No-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _thumbnail_source(image, max_side: int):
    """What the thumbnail is made from: PIL images and bytes as they are; a GPU-decoded (3, H, W)
    tensor resized to the thumbnail's size where it lies, so only that comes back to the host."""
    import torch

    if not isinstance(image, torch.Tensor):
        return image
    from blip_ops.family import resize_tensor
    from pipelines.indexing.derivatives import thumbnail_size

    tw, th = thumbnail_size(int(image.shape[2]), int(image.shape[1]), max_side)
    return _to_pil(resize_tensor(image, th, tw))


def _to_pil(image):
    """A decoded image as PIL (GPU-decoded (3, H, W) tensors come back to the host once)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
