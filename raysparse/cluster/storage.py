"""Folders on object storage (s3://, gs://, any URI pyarrow can open) for searches.

Trials need nothing from here: each reports its checkpoints to Ray Tune, which persists
them on the search's storage path (a folder or a URI) and hands the latest back to a retry
on whichever node. The driver writes its own outputs (results table, plots, best config)
locally and uploads them, reads a search's recorded settings back for `--resume URI`, and
lists a trial's folder to find a result Tune's experiment state had not caught up with.
Paths without a scheme work too (pyarrow's local filesystem). pyarrow does the I/O; its
filesystems pick up credentials from the environment or the cloud profile, never from
raysparse.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from raysparse.errors import ConfigError


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def _open(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad URIs/credentials
        raise ConfigError(f"cannot open storage {uri}: {str(exc).splitlines()[0]}") from None


def check_writable(uri: str) -> None:
    """Write and delete a probe file, so bad credentials or a missing bucket fail before any trial."""
    fs, path = _open(uri)
    probe = f"{path.rstrip('/')}/.raysparse-write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"storage {uri} cannot be written ({str(exc).splitlines()[0]}): check the bucket "
                          "and the credentials in your environment, or choose another --storage") from None


def read_text(uri: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    import pyarrow.fs

    fs, path = _open(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local folder's files to storage (overwriting what is there)."""
    import pyarrow.fs

    fs, path = _open(uri)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly inside `uri` (none when it does not exist)."""
    import pyarrow.fs

    fs, path = _open(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    return sorted(info.base_name for info in fs.get_file_info(selector)
                  if info.type == pyarrow.fs.FileType.Directory)


def delete_dir(uri: str) -> None:
    """Remove a folder and everything in it; nothing happens when it does not exist."""
    import pyarrow.fs

    fs, path = _open(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)
