"""What a stage's output folder says about itself, and what to do with it before writing: the manifest
(`_m9.json`, the commit marker) and the pending record, the fingerprint of everything that determines an
output, the chain of manifests back to the images (stored relative to each output, so a moved workdir still
works), and `prepare()`, which decides whether to skip (done, same fingerprint), resume (interrupted, same
fingerprint), update (only the input changed), start afresh, or refuse with one line naming what changed
(as DVC's lock entries and Dagster's code versions do). The names and schemas themselves are in
m9.stages.contract.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m9 import __version__
from m9.errors import InputError
from m9.io import storage
from m9.stages.contract import LEASE, MANIFEST, PENDING, STAGES, Contract

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Manifest:
    """What a finished stage wrote into its output's _m9.json: the commit marker, and what it counted."""

    stage: str
    input: str
    #: Everything that determines the output (see fingerprint()); a later run compares its own to it.
    fingerprint: dict[str, Any]
    counts: dict[str, int]
    #: Stage-specific facts (k and explained variance, actors, wall time …).
    details: dict[str, Any] = field(default_factory=dict)
    m9_version: str = __version__
    finished_at: str = ""
    #: True when a run found this output already finished and did nothing (never written to disk).
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("skipped")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest as stored; one written by an m9 before fingerprints has an empty fingerprint."""
        known = {f.name for f in dataclasses.fields(cls)} - {"skipped", "details"}
        details = dict(data.get("details") or {})
        details.update({k: v for k, v in data.items() if k not in known and k != "details"})
        return cls(
            stage=str(data.get("stage")),
            input=str(data.get("input")),
            fingerprint=dict(data.get("fingerprint") or {}),
            counts=dict(data.get("counts") or {}),
            details=details,
            m9_version=str(data.get("m9_version", "")),
            finished_at=str(data.get("finished_at", "")),
        )


def _split(uri: str) -> tuple[str, str]:
    """(bucket or "" for a local path, the path inside it)."""
    uri = storage.normalize(uri)
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return bucket, "/" + key
    return "", uri


def stored_input(output: str, src: str) -> str:
    """How output's manifest names its input src: relative to output (`../embed`) when src lies beside it
    or below its parent on the same filesystem (bucket), so a moved or copied workdir still finds its
    stages' outputs; else src itself (an input elsewhere stays where it was)."""
    (out_root, out_path), (src_root, src_path) = _split(output), _split(src)
    if out_root != src_root:
        return src
    relative = posixpath.relpath(src_path, out_path)
    parts = relative.split("/")
    return relative if parts[0] == ".." and ".." not in parts[1:] else src


def resolve_input(output: str, stored: str) -> str:
    """A manifest's input as an absolute path or URI: a relative one against the manifest's own folder
    (output); an absolute one (what earlier m9 versions wrote, or an input elsewhere) as it is."""
    if not stored or storage.is_s3(stored) or posixpath.isabs(stored) or os.path.isabs(stored):
        return stored
    root, path = _split(output)
    joined = posixpath.normpath(posixpath.join(path, stored))
    return f"s3://{root}{joined}" if root else storage.normalize(joined)


def read_manifest(output: str) -> Manifest | None:
    """The manifest of a finished stage output, or None; its input resolved to an absolute path or URI."""
    data = storage.read_json(storage.join(output, MANIFEST))
    if data is None:
        return None
    manifest = Manifest.from_json(data)
    return dataclasses.replace(manifest, input=resolve_input(output, manifest.input))


def write_manifest(output: str, manifest: Manifest) -> Manifest:
    """Mark output as finished (last write of a stage) and drop its pending record. An input that is
    another stage's output is stored relative to output (stored_input); an image tree as it is."""
    done = dataclasses.replace(manifest, finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    data = done.to_json()
    if manifest.stage in STAGES and STAGES[manifest.stage].reads is not None:
        data["input"] = stored_input(output, done.input)
    storage.write_json(storage.join(output, MANIFEST), data)
    storage.remove(storage.join(output, PENDING))
    return done


def upstream(src: str) -> dict[str, str]:
    """The stage outputs behind src, src included, by stage name: each finished manifest's input followed
    while it is another stage's output (evaluate → reduce → embed → ingest)."""
    found: dict[str, str] = {}
    folder: str | None = storage.normalize(src)
    below: str | None = None
    while folder and folder not in found.values():
        manifest = read_manifest(folder)
        if manifest is None and below is not None:
            # An earlier m9 wrote absolute inputs: after a move, the folder of that name beside this one.
            beside = storage.join(_parent(below), folder.rstrip("/").rsplit("/", 1)[-1])
            manifest, folder = read_manifest(beside), beside
        if manifest is None or manifest.stage not in STAGES:
            break
        found[manifest.stage] = below = folder
        folder = manifest.input if STAGES[manifest.stage].reads is not None else None
    return found


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(src: str, suffix: str = ".parquet") -> str:
    """Who the input is: the fingerprint of the stage output it is (a chain, as DVC's), else a hash of
    its files' names, sizes and modification times."""
    upstream = read_manifest(src)
    if upstream is not None and upstream.fingerprint:
        return f"{upstream.stage}:{digest(upstream.fingerprint)}"
    return f"files:{digest(listing(src, suffix))}"


def listing(src: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of the files under src ending with suffix, sorted."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(src)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    return sorted(
        (i.path[len(root) :].lstrip("/"), int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_"))
    )


def fingerprint(contract: Contract, cfg: Any, input_id: str, **extra: Any) -> dict[str, Any]:
    """Everything that determines a stage's output: the input's identity, m9's version, the config
    fields the contract says change the output, and `extra` (weights checksum, preprocessing version …)."""
    values = {name: getattr(cfg, name) for name in contract.changes_output if name not in extra}
    return {"input": input_id, "m9_version": __version__, **values, **extra}


def unclassified_fields(contract: Contract, cfg_type: type) -> list[str]:
    """Config fields the contract neither counts as changing the output nor as not changing it."""
    known = {"input", "output", *contract.changes_output, *contract.does_not_change_output}
    return [f.name for f in dataclasses.fields(cfg_type) if f.name not in known]


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, in words: `k 50 → 10, input changed`."""
    if not old:
        return "it was made by an earlier m9 that did not record its fingerprint"
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "input":
            parts.append("the input changed")
        else:
            parts.append(f"{key} {_short(old.get(key))} → {_short(new.get(key))}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text if len(text) <= 24 else text[:12] + "…"


def check_not_a_file(output: str) -> None:
    """Refuse a local output that is, or lies under, a file (it would be a traceback later, or with
    --overwrite the file would be deleted). S3 has no such thing: a key and a prefix may share a name."""
    if storage.is_s3(output):
        return
    path = Path(output)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"lies under {candidate}, which is"
                raise InputError(f"output {output} {where} a file, not a folder; choose a folder")
            return


def _top_names(output: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(output)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


def owned_files(contract: Contract, output: str) -> list[str]:
    """What a stage wrote into its output folder so far, but not its bookkeeping (lease, pending record)."""
    return [n for n in _top_names(output) if n not in (LEASE, PENDING) and contract.owns(n)]


_REDO = "pass --overwrite to redo it, or choose another output folder"


def prepare(
    contract: Contract,
    output: str,
    print_: dict[str, Any],
    overwrite: bool,
    before_start: Callable[[], None] | None = None,
    in_place: bool = False,
) -> Manifest | None:
    """Decide what to do with the output folder before a stage writes into it (call with its lease held).

    Returns the manifest when the output is finished with the same fingerprint (the caller skips);
    clears the folder when overwrite is set; otherwise records print_ as the run in progress and
    returns None (a fresh start, the resume of an interrupted run with the same fingerprint, or an update).
    An output (finished or interrupted) whose fingerprint differs only in its input is updated, not refused:
    a stage that updates in place (in_place: it keeps what still holds for the new input) finds its files
    as they were, less the manifest; any other stage finds the folder cleared and starts afresh.
    before_start, if given, runs just before that record is written: a stage's own refusals there leave
    the folder untouched.
    Raises InputError, naming what changed, for a finished or interrupted output made differently in
    anything but its input, another stage's output, or a folder holding files the stage does not own.
    """
    check_not_a_file(output)
    if overwrite:
        for name in _top_names(output):
            if name != LEASE:
                storage.remove(storage.join(output, name))
        storage.write_json(storage.join(output, PENDING), print_)
        return None
    manifest = read_manifest(output)
    updating = False
    if manifest is not None:
        if manifest.stage != contract.name:
            raise InputError(
                f"{output} holds the output of `m9 {manifest.stage}` on {manifest.input}; "
                f"choose another output folder or pass --overwrite to replace it"
            )
        if manifest.fingerprint == print_:
            return dataclasses.replace(manifest, skipped=True)
        if not only_input_changed(manifest.fingerprint, print_, contract.follows_input):
            raise InputError(
                f"{output} already holds a finished `{contract.producer}` output made differently "
                f"({describe_change(manifest.fingerprint, print_)}); {_REDO}"
            )
        log.info("%s: the input of %s changed; updating it", contract.name, output)
        _start_update(contract, output, in_place, print_)
        updating = True
    foreign = sorted(n for n in _top_names(output) if not contract.owns(n))
    if foreign:
        raise InputError(
            f"{output} already holds files m9 did not write (e.g. {foreign[0]}); "
            f"choose another output folder or pass --overwrite to replace it"
        )
    pending = storage.read_json(storage.join(output, PENDING))
    started = [n for n in _top_names(output) if n not in (LEASE, PENDING)]
    if pending is not None and started and pending != print_:
        if not only_input_changed(pending, print_, contract.follows_input):
            raise InputError(
                f"{output} holds an interrupted `{contract.producer}` run made differently "
                f"({describe_change(pending, print_)}); run the same command as before to resume it, or {_REDO}"
            )
        log.info("%s: the input of the interrupted run in %s changed; updating it", contract.name, output)
        _start_update(contract, output, in_place, print_)
        started = [n for n in _top_names(output) if n not in (LEASE, PENDING)]
        updating = True
    if before_start is not None:
        before_start()
    if started and not updating:
        log.info("%s: resuming the interrupted run in %s", contract.name, output)
    storage.write_json(storage.join(output, PENDING), print_)
    return None


def only_input_changed(old: Mapping[str, Any], new: Mapping[str, Any], follows: tuple[str, ...] = ()) -> bool:
    """Whether two fingerprints differ in their input and in nothing else but the keys that follow it
    (an update, not a new output)."""
    same = dict.fromkeys(("input", *follows))
    return bool(old) and old.get("input") != new.get("input") and {**old, **same} == {**new, **same}


def _start_update(contract: Contract, output: str, in_place: bool, print_: Mapping[str, Any]) -> None:
    """Make a finished or interrupted output ready for its stage to update: unfinished (no manifest), and,
    unless the stage updates in place, empty but for its lease. The new run's record is written first, so
    that an output killed meanwhile still says whose it is."""
    storage.write_json(storage.join(output, PENDING), dict(print_))
    for name in owned_files(contract, output):
        if not in_place or name == MANIFEST:
            storage.remove(storage.join(output, name))
