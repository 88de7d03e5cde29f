"""Local paths and `s3://` URIs behind one small interface (pyarrow filesystems), and their Spark spelling."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from m9.errors import StorageError, first_line

log = logging.getLogger(__name__)

#: Environment variable naming an S3-compatible endpoint (MinIO, moto, Ceph); AWS_ENDPOINT_URL works too.
S3_ENDPOINT_ENV = "M9_S3_ENDPOINT"

#: Attempts per S3 request (pyarrow's AWS standard strategy: exponential backoff with jitter, capped at
#: 20 s). pyarrow's default of 3 gives up inside a second of S3's 503 SlowDown bursts; 10 rides out
#: about a minute of throttling or dropped connections, after which the store is down rather than busy.
S3_MAX_ATTEMPTS = 10

#: Seconds to wait for a TCP connection to the store: long enough for a loaded endpoint across regions,
#: short enough that a wrong --s3-endpoint fails in seconds rather than minutes (with the retries above).
S3_CONNECT_TIMEOUT_S = 10

#: Name of the object check_access puts and deletes to test a write; `_`-prefixed, so Spark and m9's listings skip it.
WRITE_PROBE = "_m9-write-probe"


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
    return (
        os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who m9 is there, as the driver's environment says; handed to workers explicitly,
    since a Ray worker's environment is the one its node started with, not the driver's."""

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, endpoint: str | None = None) -> S3Settings:
        """Endpoint (unless given), region and key-pair credentials from the environment. Credentials from a
        profile or an instance role are not read here: each process's AWS SDK finds those itself."""
        env = os.environ
        return cls(
            endpoint=endpoint or s3_endpoint(),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )


#: The S3 settings of the command running in this thread (see using()); None: read the environment.
_current: contextvars.ContextVar[S3Settings | None] = contextvars.ContextVar("m9_s3_settings", default=None)


@contextlib.contextmanager
def using(settings: S3Settings | None):
    """Make settings the S3 settings of everything m9 does inside the block (in this thread), e.g. the
    `--s3-endpoint` of one command, without changing the process's environment; restored on exit."""
    token = _current.set(settings)
    try:
        yield settings
    finally:
        _current.reset(token)


def current_settings() -> S3Settings:
    """The settings in force: those of the enclosing using() block, else the environment's."""
    return _current.get() or S3Settings.from_env()


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": settings.region,
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if settings.endpoint:
        scheme, _, host = settings.endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") or scheme, scheme=scheme if host else "http")
    if settings.access_key and settings.secret_key:
        kwargs.update(
            access_key=settings.access_key, secret_key=settings.secret_key, session_token=settings.session_token
        )
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


def filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an S3 URI (settings from the
    environment unless given)."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    parsed = urlparse(uri)
    return _s3_filesystem(s3 or current_settings()), f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def _refused(exc: OSError) -> bool:
    """True for pyarrow's report of an S3 request answered 403 (AccessDenied)."""
    return "ACCESS_DENIED" in str(exc) or "HTTP response code: 403" in str(exc)


def exists(uri: str) -> bool:
    """True when a file or a non-empty folder exists at uri."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        # pyarrow first HEADs the prefix's own key (`inputs` for s3://bucket/inputs), which needs
        # s3:GetObject on that key; a policy granting only `inputs/*` gets 403 there although it may list
        # below it. Listing then answers the question.
        if not (is_s3(uri) and _refused(exc)):
            raise
        try:
            return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))
        except FileNotFoundError:
            return False
        except OSError:
            raise exc from None  # listing is refused too: the HEAD's error says what is missing
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


#: S3 error codes meaning the credentials themselves were not accepted (as opposed to lacking a right).
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}


def s3_client(settings: S3Settings | None = None):
    """A boto3 S3 client for the store in settings (default: the environment's), with m9's retries."""
    return _s3_client(settings or current_settings())


def _s3_client(settings: S3Settings):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        s3={"addressing_style": "path"} if settings.endpoint else None,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        config=config,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
    )


def _explain(exc: Exception, uri: str, action: str, settings: S3Settings) -> StorageError:
    """One sentence naming what went wrong with uri and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    bucket = urlparse(uri).netloc
    at = f" at {settings.endpoint}" if settings.endpoint else ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"no AWS credentials found to {action} {uri}; set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role provides them"
        )
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"cannot reach S3{at or ' (AWS)'} to {action} {uri}: {exc}; check --s3-endpoint "
            f"(or ${S3_ENDPOINT_ENV} / $AWS_ENDPOINT_URL) and that the store is running"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") and status == 404:
            return StorageError(
                f"bucket {bucket} does not exist{at} (needed to {action} {uri}); create it "
                f"(`aws s3 mb s3://{bucket}`) or fix the URI"
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3{at} refused m9's credentials ({code}) to {action} {uri}; set "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                f"keys) or AWS_PROFILE to valid credentials"
            )
        if code == "AccessDenied" or status == 403:
            rights = (
                "s3:ListBucket, s3:PutObject and s3:DeleteObject"
                if action == "write"
                else ("s3:ListBucket and s3:GetObject")
            )
            return StorageError(
                f"access denied{at} to {action} {uri}; the credentials in use need {rights} on bucket {bucket}"
            )
        return StorageError(
            f"cannot {action} {uri}: S3{at} answered {code or status}: "
            f"{exc.response.get('Error', {}).get('Message', '')}"
        )
    return StorageError(f"cannot {action} {uri}: {first_line(exc)}")


def outage(exc: BaseException) -> StorageError | None:
    """A StorageError for an S3 request that kept failing past S3_MAX_ATTEMPTS in the middle of a stage (or
    was refused, 403, which no retry changes), or None when exc is something else.

    pyarrow reports those as OSError("… AWS Error …"), in the driver or inside a Ray task (which Ray
    re-raises as a RayTaskError that is also an OSError, the task's exception in `.cause`).
    """
    seen: set[int] = set()
    link: BaseException | None = exc  # exc, then its causes
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        refused = _s3a_refusal(str(link)) if type(link).__name__ == "Py4JJavaError" else None
        if refused:
            return refused
        if isinstance(link, OSError):
            line = next((ln.strip() for ln in str(link).splitlines() if "AWS Error" in ln), None)
            if line:
                line = line.removeprefix("OSError: ").rstrip(".")
                if "ACCESS_DENIED" in line:  # a missing right, not a busy store: retrying cannot help
                    return StorageError(
                        f"S3 refused a request: {line}; the credentials in use lack a right on that key "
                        f"(their IAM policy, the bucket's policy or a VPC endpoint's policy)"
                    )
                return StorageError(
                    f"S3 kept failing after {S3_MAX_ATTEMPTS} attempts: {line}; everything committed before "
                    f"it is kept, so run the same command again to resume once the store answers"
                )
        link = getattr(link, "cause", None) or link.__cause__ or link.__context__
    return None


#: Hadoop's s3a names a refused request `java.nio.file.AccessDeniedException: <uri>: <operation> on <uri>: …`.
_S3A_DENIED = re.compile(r"AccessDeniedException: (s3a?://[^\s:]+): (\w+)")

#: The right each s3a operation needs on the key it names (getFileStatus HEADs the key, also a folder's own key).
_S3A_RIGHTS = {"getFileStatus": "s3:GetObject", "open": "s3:GetObject", "read": "s3:GetObject"}


def _s3a_refusal(java_text: str) -> StorageError | None:
    """A StorageError for Spark's s3a reader or writer refused by S3 (403), from the Java error's text."""
    match = _S3A_DENIED.search(java_text)
    if not match:
        return None
    uri, operation = match.group(1), match.group(2)
    right = _S3A_RIGHTS.get(operation, "the right that operation needs")
    return StorageError(
        f"S3 refused Spark's {operation} of {uri.replace('s3a://', 's3://', 1)} (403): the credentials in use need "
        f"{right} on that key (a folder's own key too: s3a reads it before listing below it); check their IAM "
        f"policy, the bucket's policy and any VPC endpoint's policy"
    )


#: (URI, read or write, settings) check_access found allowed in this process: `m9 run` and each of its
#: stages check the same prefixes, and a write check is a PUT and a DELETE, so each is asked once.
_allowed: set[tuple[str, str, S3Settings]] = set()


def check_access(read: str | None = None, write: str | None = None) -> None:
    """Fail with one actionable StorageError unless read can be listed and write can be written (S3 only).

    Stages call this first, so a missing bucket or refused credentials show before any engine starts.
    What was allowed once is not asked again in this process (with the same settings); a refusal is.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    for uri, action in ((read, "read"), (write, "write")):
        if not uri or not is_s3(uri):
            continue
        settings = current_settings()
        if (uri, action, settings) in _allowed:
            continue
        parsed = urlparse(uri)
        bucket, key = parsed.netloc, parsed.path.strip("/")
        try:
            client = _s3_client(settings)
            if action == "read":
                client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            else:
                probe = "/".join(p for p in (key, f"{WRITE_PROBE}-{uuid.uuid4().hex}") if p)
                client.put_object(Bucket=bucket, Key=probe, Body=b"")
                client.delete_object(Bucket=bucket, Key=probe)
        except (BotoCoreError, ClientError) as exc:
            raise _explain(exc, uri, action, settings) from None
        _allowed.add((uri, action, settings))
