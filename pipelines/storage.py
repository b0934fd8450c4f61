"""Local folders and S3 behind one pyarrow filesystem.

S3 credentials come only from the standard AWS chain (environment, ~/.aws, instance role); the
endpoint and region may come from the config (``s3.endpoint_url``, ``s3.region``) or from the
chain's own variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``), so any S3-compatible server works.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    """The non-secret S3 settings (mirrors ``pipelines.config.S3Config``)."""

    endpoint_url: str | None = None
    region: str | None = None
    allow_http: bool = False
    max_attempts: int = 10  # per request, pyarrow's client (its own default is 3)

    @classmethod
    def from_config(cls, s3) -> S3Settings:
        return cls(
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            allow_http=s3.allow_http,
            max_attempts=s3.max_attempts,
        )

    def resolved(self) -> S3Settings:
        """Endpoint and region filled in from the AWS chain; a plain-http endpoint is refused
        unless ``allow_http``. Every S3 client of the project (pyarrow, LanceDB) goes through it."""
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint and urlparse(endpoint).scheme == "http" and not self.allow_http:
            raise ValueError(
                f"s3 endpoint {endpoint!r} is plain http; set s3.allow_http=true (local test servers only)"
            )
        return S3Settings(endpoint, region, self.allow_http, self.max_attempts)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def filesystem_for(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or ``s3://bucket/prefix``."""
    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    settings = (s3 or S3Settings()).resolved()
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts)
    }
    if settings.region:
        kwargs["region"] = settings.region
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
        kwargs["scheme"] = endpoint.scheme or "https"
    parsed = urlparse(uri)
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")


def join(base: str, *parts: str) -> str:
    """Join filesystem paths with '/' (pyarrow paths, local or S3)."""
    return posixpath.join(base, *parts)


def parquet_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The Parquet files under ``root`` (hidden ``_``/``.`` entries skipped, as dataset readers
    do; other files, such as images beside them, ignored)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in i.path[len(root) :].split("/") if part)
    )


def list_parquet_files(uri: str, s3: S3Settings) -> list[str]:
    """The catalog's Parquet files (:func:`parquet_files`); none is an error."""
    files = parquet_files(*filesystem_for(uri, s3))
    if not files:
        raise FileNotFoundError(f"no Parquet files under source {uri!r}")
    return files
