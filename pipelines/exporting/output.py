"""Where an export goes and how it is published: the temporary sibling it is written under, the
stale temporaries of killed exports, and the commit that makes it appear complete.

Atomicity: everything is written under a hidden sibling ``.<name>.export-<id>.tmp`` (with an
``_owner.json`` naming host and pid). Locally that folder, ``_SUCCESS`` included, is renamed to
``--out`` in one ``rename``: ``--out`` either does not exist or is complete. S3 has no rename: the
data is written under the temporary prefix (where nearly all the time goes), then copied
server-side to ``--out``, then ``_manifest.json`` and ``_SUCCESS`` are written last and the
temporary prefix deleted; a kill during that short copy leaves files without ``_SUCCESS`` (readers
of S3 exports must check it, as with Spark's), and a rerun refuses that prefix until it is deleted.
A later export to the same ``--out`` deletes temporaries left by a dead export of this host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from pipelines.exporting.errors import ExportError
from pipelines.exporting.parquet import WrittenFile
from pipelines.storage import S3Settings, filesystem_for, is_s3, join

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
CONFIG_FILE = "_config.resolved.yaml"
OWNER = "_owner.json"
_COPY_OBJECT_LIMIT = 5 * 2**30  # S3 CopyObject refuses larger objects: stream those instead


@dataclass
class Output:
    """Where an export goes: the final folder and the temporary sibling it is written under."""

    uri: str
    fs: pafs.FileSystem
    final: str  # filesystem path of --out
    tmp: str  # filesystem path of the temporary sibling
    s3: bool


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entries(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent, name


def clean_stale_temporaries(fs: pafs.FileSystem, final: str) -> list[str]:
    """Delete the temporaries a dead export of this host left beside ``final``; warn about others
    (a live export, or one of another host). Returns the deleted paths."""
    parent, name = _split(final)
    pattern = re.compile(rf"^\.{re.escape(name)}\.export-[0-9A-Za-z-]+\.tmp$")
    deleted = []
    for info in _entries(fs, parent):
        if info.type != pafs.FileType.Directory or not pattern.match(info.base_name):
            continue
        try:
            with fs.open_input_stream(join(info.path, OWNER)) as f:
                owner = json.loads(f.read())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname() and not _is_alive(int(owner.get("pid", 0))):
            fs.delete_dir(info.path)
            deleted.append(info.path)
            logger.info("deleted %s, left by a killed export (pid %s)", info.path, owner["pid"])
        else:
            logger.warning(
                "%s belongs to an export still running or on another host (%s); delete it when "
                "none is running",
                info.path,
                owner or "no owner file",
            )
    return deleted


def prepare_output(out: str, s3: S3Settings, export_id: str) -> Output:
    """Check ``out`` (absent or an empty folder) and create the temporary folder beside it."""
    fs, final = filesystem_for(out, s3)
    parent, name = _split(final)
    if not name or (is_s3(out) and not parent):
        raise ExportError(f"--out {out!r} must name a folder (s3://bucket/prefix on S3)")
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.File:
        raise ExportError(f"--out {out} is an existing file")
    existing = _entries(fs, final) if info.type == pafs.FileType.Directory else []
    if existing:
        complete = any(e.base_name == SUCCESS for e in existing)
        raise ExportError(
            f"--out {out} is not empty ({len(existing)} entries"
            + (", a complete export" if complete else ", no _SUCCESS: an unfinished export")
            + "); delete it or choose another folder"
        )
    tmp = join(parent, f".{name}.export-{export_id}.tmp")
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "export_id": export_id,
        "out": out,
        "started_at": utc_now(),
    }
    try:
        clean_stale_temporaries(fs, final)
        fs.create_dir(tmp, recursive=True)
        _write_bytes(fs, join(tmp, OWNER), json.dumps(owner).encode())
    except OSError as err:
        raise ExportError(f"cannot write beside --out {out}: {err}") from None
    return Output(out, fs, final, tmp, is_s3(out))


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _copy(fs: pafs.FileSystem, src: str, dst: str, size: int) -> None:
    if size < _COPY_OBJECT_LIMIT:
        fs.copy_file(src, dst)  # server-side CopyObject on S3
        return
    with fs.open_input_stream(src) as fin, fs.open_output_stream(dst) as fout:
        while chunk := fin.read(64 * 2**20):
            fout.write(chunk)


def commit(output: Output, files: Sequence[WrittenFile], config_yaml: str, manifest: dict) -> None:
    """Publish the export: ``_SUCCESS`` is the last file written, and locally the whole folder
    appears at once (one rename)."""
    fs, tmp = output.fs, output.tmp
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if not output.s3:
        _write_bytes(fs, join(tmp, CONFIG_FILE), config_yaml.encode())
        _write_bytes(fs, join(tmp, MANIFEST), manifest_bytes)
        fs.delete_file(join(tmp, OWNER))
        _write_bytes(fs, join(tmp, SUCCESS), b"")
        try:
            os.replace(tmp, output.final)  # atomic; onto an empty folder too
        except OSError as err:
            raise ExportError(f"--out {output.uri} appeared while exporting: {err}") from None
        return
    try:
        for f in files:
            _copy(fs, join(tmp, f.path), join(output.final, f.path), f.bytes)
    except BaseException:
        fs.delete_dir_contents(output.final, missing_dir_ok=True)  # a failure, not a kill
        raise
    _write_bytes(fs, join(output.final, CONFIG_FILE), config_yaml.encode())
    _write_bytes(fs, join(output.final, MANIFEST), manifest_bytes)
    _write_bytes(fs, join(output.final, SUCCESS), b"")
    fs.delete_dir(tmp)


def abandon(output: Output) -> None:
    """Remove the temporary folder of an export that failed (not of one that was killed)."""
    try:
        if output.fs.get_file_info(output.tmp).type == pafs.FileType.Directory:
            output.fs.delete_dir(output.tmp)
    except OSError as err:
        logger.warning("could not delete %s: %s", output.tmp, err)
