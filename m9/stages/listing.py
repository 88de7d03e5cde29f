"""The image tree as ingest sees it: every entry under an input, listed as Spark's binaryFile source will read
it (Hadoop's rules for hidden files and symlinks), with the files nobody can read and their reasons."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from m9.config import IMAGE_EXTENSIONS
from m9.errors import InputError
from m9.io import storage


def glob_of(extensions=IMAGE_EXTENSIONS) -> str:
    """A Hadoop glob matching the extensions in any case, e.g. *.{[jJ][pP][gG],…}."""

    def anycase(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" for c in ext)

    return "*.{" + ",".join(anycase(e) for e in extensions) + "}"


def is_image(name: str, extensions=IMAGE_EXTENSIONS) -> bool:
    """Whether a file name ends with one of the extensions, in any case."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in extensions


def parse_extensions(text: str) -> tuple[str, ...]:
    """`--extensions jpg,PNG,.webp` → ("jpg", "png", "webp")."""
    exts = tuple(dict.fromkeys(e.strip().lstrip(".").lower() for e in text.split(",") if e.strip()))
    if not exts or not all(e.isalnum() for e in exts):
        raise ValueError(f"--extensions {text}: expected comma-separated extensions like jpg,png,webp")
    return exts


@dataclass
class Listing:
    """Every entry under an input: the files Spark reads (path inside the filesystem, size, mtime in ns), how
    many hidden ones it skips, and the ones nobody can read, each with its reason."""

    files: list[tuple[str, int, int]] = field(default_factory=list)
    hidden: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def hidden(rel: str) -> bool:
    """Whether Hadoop skips a relative path: any part of it starting with '.' or '_'."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def walk_local(root: str) -> Listing:
    """The local tree as Hadoop's local filesystem lists it: symlinks followed (to files and to folders, as
    Hadoop's getFileStatus does; a file reached through two paths is two images, as Spark reads it), except
    a link whose target is gone, which Hadoop drops without a word and m9 counts as unreadable; a file the
    user cannot read is counted too (Spark would fail on it)."""
    listing = Listing()
    for top, dirs, names in os.walk(root, followlinks=True):
        real_top = os.path.realpath(top)
        for d in list(dirs):
            real = os.path.realpath(os.path.join(top, d))
            if real_top == real or real_top.startswith(real + os.sep):
                # Hadoop's listing follows it again and again (until the path is too long): no count of
                # the tree would be right, so the user removes the link.
                raise InputError(
                    f"{os.path.join(top, d)} links back to {real}, a folder above it: Spark would read that "
                    f"tree over and over; remove the link (or move the images out of its way)"
                )
        for name in sorted(names):
            path = os.path.join(top, name)
            rel = path[len(root) :].lstrip("/")
            if hidden(rel):
                listing.hidden += 1
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                listing.unreadable.append((path, f"dangling symlink to {os.readlink(path)}"))
                continue
            except OSError as exc:  # a symlink loop, an I/O error
                listing.unreadable.append((path, f"cannot stat: {exc.strerror or exc}"))
                continue
            if not os.path.isfile(path):
                listing.unreadable.append((path, "not a regular file"))
            elif not os.access(path, os.R_OK):
                listing.unreadable.append((path, "permission denied"))
            else:
                listing.files.append((path, st.st_size, st.st_mtime_ns))
    return listing


def list_tree(src: str) -> Listing:
    """Every entry under src: what Spark will see, the hidden files it skips, and the unreadable ones.

    Hadoop skips names starting with '.' or '_' (hidden and bookkeeping files, or any file below such a
    folder); so does this listing, and m9 never reads them, but it counts them so the user can see them.
    Spark's file scans also drop zero-byte files without a word, so m9 lists the tree itself to find them.
    """
    fs, root = storage.filesystem(src)
    if not storage.is_s3(src):
        return walk_local(root)
    listing = Listing()
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        if hidden(info.path[len(root) :].lstrip("/")):
            listing.hidden += 1
            continue
        listing.files.append((info.path, info.size, int(info.mtime_ns or 0)))
    return listing


def unreadable_summary(reasons: dict[str, int]) -> str:
    """`2 dangling symlink, 1 permission denied` from {reason kind: count}."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items()))
