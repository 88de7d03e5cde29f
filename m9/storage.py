"""Local paths and `s3://` URIs behind one small interface (pyarrow filesystems), and their Spark spelling."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

#: Environment variable naming an S3-compatible endpoint (MinIO, moto, Ceph); AWS_ENDPOINT_URL works too.
S3_ENDPOINT_ENV = "M9_S3_ENDPOINT"


def is_s3(uri: str) -> bool:
    """True for `s3://`, `s3a://` and `s3n://` URIs."""
    return urlparse(str(uri)).scheme in ("s3", "s3a", "s3n")


def normalize(uri: str | os.PathLike) -> str:
    """An absolute local path, or an `s3://bucket/key` URI without a trailing slash."""
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        return f"s3://{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the environment, if one is set."""
    return os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an S3 URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    parsed = urlparse(uri)
    endpoint = s3_endpoint()
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def exists(uri: str) -> bool:
    """True when a file or a non-empty folder exists at uri."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return True
    if info.type == pafs.FileType.Directory or is_s3(uri):
        try:
            return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))
        except (FileNotFoundError, OSError):
            return False
    return False


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly below uri whose name ends with suffix (sorted), skipping hidden and `_` files."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_"))
    )
    return [join(uri, n) for n in names]


def read_json(uri: str) -> dict | None:
    """The JSON object stored at uri, or None when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write data so that readers see either nothing or the whole file (rename locally; one PUT on S3)."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(uri: str, obj: dict) -> None:
    """Write a JSON object atomically."""
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove(uri: str) -> None:
    """Delete a file or folder tree if it exists."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif is_s3(uri):
        fs.delete_dir_contents(path, missing_dir_ok=True)


def makedirs(uri: str) -> None:
    """Create a local folder (S3 has no folders to create)."""
    if not is_s3(uri):
        Path(normalize(uri)).mkdir(parents=True, exist_ok=True)
