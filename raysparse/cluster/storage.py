"""Folders on object storage (s3://, gs://, any URI pyarrow can open) for searches.

A search whose `--storage` is a URI cannot have trials write their folders straight to
storage the way a shared filesystem allows. Instead each trial works in its node-local
folder and mirrors it to storage after every finished iteration (before reporting it, so
what Tune has seen is always on storage; Tune's own artifact sync is asynchronous and
skips a sync while one is running), and a trial that starts on a fresh node (a retry after
the first node died) first downloads what its earlier attempt uploaded, so it resumes from
the last finished iteration. The driver
writes its own outputs (results table, plots, best config) locally and uploads them.
pyarrow does the I/O; its filesystems pick up credentials from the environment or the
cloud profile, never from raysparse.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

from raysparse.errors import ConfigError

logger = logging.getLogger(__name__)


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


def download_dir(uri: str, local: Path) -> bool:
    """Copy a folder from storage into `local`; False when storage has no such folder."""
    import pyarrow.fs

    fs, path = _open(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    logger.info("downloaded %s to %s", uri, local)
    return True


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local folder's files to storage (overwriting what is there)."""
    import pyarrow.fs

    fs, path = _open(uri)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


def mirror_dir(local: Path, uri: str) -> None:
    """Upload `local`, then drop top-level entries storage has but `local` no longer does
    (a finished trial's iteration checkpoint), so storage shows the folder as it is."""
    import pyarrow.fs

    upload_dir(local, uri)
    fs, path = _open(uri)
    present = {entry.name for entry in local.iterdir()}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if name not in present:
            if info.type == pyarrow.fs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
