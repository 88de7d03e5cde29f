"""One writer per output: a lease file in the output folder naming host, process and start time.

Locally the lease is a file held with an exclusive `flock`: the kernel releases it when its holder dies,
so a killed run's lease is free at once. On S3 the lease is an object created with a conditional PUT
(`If-None-Match: *`), renewed by its holder every LEASE_RENEW_S; another writer is refused while it is
fresh, and takes it over (a conditional PUT on the stale object's ETag, so only one can) when its holder
is gone: the same host's process no longer exists, or it was not renewed for LEASE_TTL_S.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from m9.errors import M9Error
from m9.io import storage
from m9.stages.contract import LEASE, PENDING

log = logging.getLogger(__name__)

#: Seconds an S3 lease stays valid without renewal. Long enough that a stalled but live writer (a long
#: GC pause, S3 retries) keeps it; short enough that a crashed writer's output is free again soon.
LEASE_TTL_S = 120

#: The holder renews its S3 lease this often: four renewals fit in one TTL, so a few failed PUTs in a
#: row do not lose it.
LEASE_RENEW_S = 30


class OutputBusyError(M9Error):
    """Another m9 process is writing the same output."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    host: str
    pid: int
    started_at: str
    stage: str
    #: Tells two leases of one process apart (and a lease from its holder's own lost-answer retry).
    token: str = ""

    @classmethod
    def me(cls, stage: str) -> Holder:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        return cls(host=socket.gethostname(), pid=os.getpid(), started_at=now, stage=stage, token=uuid.uuid4().hex)

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            fields = json.loads(data.decode())
            return cls(
                host=str(fields["host"]),
                pid=int(fields["pid"]),
                started_at=str(fields["started_at"]),
                stage=str(fields["stage"]),
                token=str(fields.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def alive_here(self) -> bool | None:
        """Whether this holder's process still runs, when it is on this host (None: cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _busy(output: str, holder: Holder | None, until: str = "") -> OutputBusyError:
    who = (
        f"`m9 {holder.stage}` (pid {holder.pid} on {holder.host}, since {holder.started_at})"
        if holder
        else "another m9 process"
    )
    return OutputBusyError(f"{output} is being written by {who}; wait for it to finish, or write elsewhere{until}")


@contextlib.contextmanager
def hold(output: str, stage: str, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S) -> Iterator[Holder]:
    """Hold the output's lease while the block runs; raise OutputBusyError if another writer holds it."""
    me = Holder.me(stage)
    if storage.is_s3(output):
        with _hold_s3(output, me, ttl_s, renew_s):
            yield me
    else:
        with _hold_local(output, me):
            yield me


@contextlib.contextmanager
def _hold_local(output: str, me: Holder) -> Iterator[None]:
    import fcntl

    folder = Path(storage.normalize(output))
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEASE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = Holder.parse(os.pread(fd, 4096, 0))
            except OSError:
                holder = None
            os.close(fd)
            raise _busy(output, holder) from None
        # The holder before us may have deleted the file between our open and our lock: then we hold
        # a lock on a file nobody else will see; start over on the one that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.to_bytes(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so a waiter re-checks the inode and starts over
        os.close(fd)
        # A stage refused before writing anything leaves no folder behind that it created.
        with contextlib.suppress(OSError):
            if created and {p.name for p in folder.iterdir()} <= {PENDING}:
                (folder / PENDING).unlink(missing_ok=True)
                folder.rmdir()


def _s3_parts(output: str) -> tuple[str, str]:
    parsed = urlparse(storage.join(output, LEASE))
    return parsed.netloc, parsed.path.lstrip("/")


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _hold_s3(output: str, me: Holder, ttl_s: float, renew_s: float) -> Iterator[None]:
    from botocore.exceptions import ClientError

    client = storage.s3_client()
    bucket, key = _s3_parts(output)
    body = me.to_bytes()
    try:
        etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
    except ClientError as exc:
        if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise
        etag = _take_over_s3(client, output, bucket, key, me, ttl_s)
    state = {"etag": etag, "lost": False}
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(renew_s):
            try:
                state["etag"] = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=state["etag"])["ETag"]
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey"):
                    state["lost"] = True
                    log.warning("lost the lease on %s to another writer", output)
                    return
                log.warning("could not renew the lease on %s: %s", output, exc)

    renewer = threading.Thread(target=renew, name="m9-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)
        if not state["lost"]:
            with contextlib.suppress(ClientError):
                client.delete_object(Bucket=bucket, Key=key, IfMatch=state["etag"])


def _take_over_s3(client, output: str, bucket: str, key: str, me: Holder, ttl_s: float) -> str:
    """The ETag of our lease after replacing a stale one, or OutputBusyError while it is fresh."""
    from botocore.exceptions import ClientError

    body = me.to_bytes()
    try:
        current = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:  # released between our PUT and this GET: try to create it once more
        if _code(exc) not in ("NoSuchKey", "404"):
            raise
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except ClientError:
            raise _busy(output, None) from None
    holder = Holder.parse(current["Body"].read())
    if holder == me:  # our own PUT went through, but its answer was lost and the retry was refused
        return current["ETag"]
    # Ages by the store's clock (its Date header and the object's LastModified), not this host's.
    server_now = _server_time(current) or dt.datetime.now(dt.UTC)
    age = (server_now - current["LastModified"]).total_seconds()
    alive = holder.alive_here() if holder else None
    if alive is True or (alive is None and age < ttl_s):
        until = "" if alive else f" (if that process is gone, its lease expires in {max(1, round(ttl_s - age))} s)"
        raise _busy(output, holder, until)
    log.info(
        "taking over the lease on %s from %s (%s)",
        output,
        f"pid {holder.pid} on {holder.host}" if holder else "an unreadable holder",
        "its process is gone" if alive is False else f"not renewed for {age:.0f} s",
    )
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=current["ETag"])["ETag"]
    except ClientError as exc:
        if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "ConditionalRequestConflict"):
            raise _busy(output, None) from None  # another writer took it over first
        raise


def _server_time(response: dict) -> dt.datetime | None:
    from email.utils import parsedate_to_datetime

    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        return None
