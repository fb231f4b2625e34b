"""Build the worker image for a real node without Docker: ``python tools/realnode_image.py REF``.

Dockerfile.worker is the contract: its final ``USER``, ``ENV``, ``ENTRYPOINT``, ``CMD`` and
``WORKDIR`` are read from the file and given to the image built here, so the two cannot drift.
What differs is only the base: a Debian bookworm root filesystem (``../shared/realnode/rootfs.sh``)
with CPU torch instead of a CUDA pytorch image.

Steps, each cached under ``${XDG_CACHE_HOME:-~/.cache}/embedjob/realnode``:
1. a base root filesystem (python3, venv, CA certificates);
2. a wheelhouse of the worker's dependencies, built by the host's pip (the chroot has no pip
   configuration of its own, and the host's already knows where torch's CPU build lies),
   keyed by pyproject.toml;
3. a fresh copy of the base with ``/opt/venv`` holding those wheels and this checkout's
   embedjob wheel, the contract's user and directories; packed by realnode's ``mkimage.py``
   (plus the ``WORKDIR`` it has no flag for) and imported into containerd's ``k8s.io``
   namespace. Needs root and a running node (``node.sh up``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REALNODE = REPO.parent / "shared" / "realnode"
TORCH = "torch==2.13.0"
VENV = "/opt/venv"
PACKAGES = ("python3", "python3-venv", "ca-certificates")


@dataclass
class Contract:
    """What an image must agree on with Dockerfile.worker."""

    user: str = ""
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def parse_dockerfile(path: Path) -> Contract:
    """The final stage's runtime contract (USER, WORKDIR, ENTRYPOINT, CMD, ENV)."""
    contract = Contract()
    for word, rest in _instructions(path.read_text()):
        if word == "FROM":
            contract = Contract()
        elif word == "USER":
            contract.user = rest
        elif word == "WORKDIR":
            contract.workdir = rest
        elif word in ("ENTRYPOINT", "CMD"):
            setattr(contract, word.lower(), json.loads(rest))
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                contract.env[key] = value
    return contract


def image_env(contract: Contract) -> dict[str, str]:
    """The contract's environment, with the venv first on PATH (the Dockerfile's base has its
    Python on PATH already)."""
    return {"PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **contract.env}


def _run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def _cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "embedjob" / "realnode"


def base_rootfs(cache: Path) -> Path:
    rootfs = cache / "rootfs-base"
    _run([str(REALNODE / "rootfs.sh"), str(rootfs), *PACKAGES])
    return rootfs


def wheelhouse(cache: Path) -> Path:
    """Dependency wheels for the worker, keyed by pyproject.toml; rebuilt when it changes."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    house = cache / f"wheels-{key[:12]}"
    if not (house / ".complete").exists():
        shutil.rmtree(house, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(house), TORCH,
              f"{REPO}[worker]"])
        for stale in house.glob("embedjob-*.whl"):
            stale.unlink()  # the project's own wheel is built fresh for every image
        (house / ".complete").touch()
    return house


def project_wheel(out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out),
          str(REPO)])
    return next(out.glob("embedjob-*.whl"))


def _chroot(rootfs: Path, *cmd: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([shutil.which("chroot") or "/usr/sbin/chroot", str(rootfs), *cmd], env=env)


def deps_rootfs(cache: Path, base: Path, house: Path) -> Path:
    """The base plus ``/opt/venv`` with every dependency, from local wheels only; cached."""
    rootfs = cache / f"deps-{house.name.removeprefix('wheels-')}"
    if (rootfs / ".complete").exists():
        return rootfs
    partial = rootfs.with_name(rootfs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run(["cp", "-a", str(base), str(partial)])
    inside = partial / "mnt" / "wheels"
    shutil.copytree(house, inside)
    _chroot(partial, "python3", "-m", "venv", VENV)
    wheels = sorted(p.name for p in house.glob("*.whl"))
    _chroot(partial, f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-deps",
            "--no-cache-dir", *(f"/mnt/wheels/{w}" for w in wheels))
    shutil.rmtree(inside)
    (partial / ".complete").touch()
    shutil.rmtree(rootfs, ignore_errors=True)
    partial.rename(rootfs)
    return rootfs


def assemble(rootfs: Path, wheel: Path, contract: Contract) -> None:
    """Add this checkout's embedjob and lay out the contract's user and paths."""
    (rootfs / ".complete").unlink()
    shutil.copy2(wheel, rootfs / "tmp" / wheel.name)
    _chroot(rootfs, f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-deps",
            "--no-cache-dir", f"/tmp/{wheel.name}")
    (rootfs / "tmp" / wheel.name).unlink()
    _chroot(rootfs, f"{VENV}/bin/python", "-c", "import embedjob.worker.runner, esm, h5py")
    uid, _, gid = contract.user.partition(":")
    gid = gid or uid
    _chroot(rootfs, "groupadd", "--gid", gid, "embedjob")
    _chroot(rootfs, "useradd", "--uid", uid, "--gid", gid, "--no-create-home",
            "--home-dir", contract.env.get("HOME", "/"), "--shell", "/usr/sbin/nologin",
            "embedjob")
    for key in ("HOME", "TORCH_HOME", "HF_HOME"):
        if key in contract.env:
            path = rootfs / contract.env[key].lstrip("/")
            path.mkdir(parents=True, exist_ok=True)
            _run(["chown", f"{uid}:{gid}", str(path)])


def import_image(rootfs: Path, ref: str, contract: Contract, workdir: Path) -> str:
    """Pack with realnode's mkimage.py, add the WORKDIR it has no flag for, import."""
    archive = workdir / "worker-image.tar"
    env = [f"--env={k}={v}" for k, v in image_env(contract).items()]
    name = subprocess.run(
        [sys.executable, str(REALNODE / "mkimage.py"), str(rootfs), str(archive), ref,
         "--entrypoint", json.dumps(contract.entrypoint), "--cmd", json.dumps(contract.cmd),
         "--user", contract.user, *env], check=True, capture_output=True, text=True).stdout
    try:
        set_workdir(archive, contract.workdir)
        _run(["ctr", "-n", "k8s.io", "images", "import", str(archive)],
             stdout=subprocess.DEVNULL)
    finally:
        archive.unlink(missing_ok=True)
    return name.strip()


def set_workdir(archive: Path, workdir: str) -> None:
    """Rewrite an OCI archive's config with ``WorkingDir`` (and the digests that name it)."""
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        small = {n: tar.extractfile(m).read() for n, m in members.items()  # type: ignore[union-attr]
                 if m.size < (1 << 20)}
    index = json.loads(small["index.json"])
    manifest_name = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(small[manifest_name])
    config_name = "blobs/sha256/" + manifest["config"]["digest"].split(":")[1]
    config = json.loads(small[config_name])
    config["config"]["WorkingDir"] = workdir

    def blob(doc: dict) -> tuple[str, bytes]:
        data = json.dumps(doc, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    config_digest, config_bytes = blob(config)
    manifest["config"].update(digest=config_digest, size=len(config_bytes))
    manifest_digest, manifest_bytes = blob(manifest)
    index["manifests"][0].update(digest=manifest_digest, size=len(manifest_bytes))
    replaced = {"index.json": json.dumps(index).encode(),
                "blobs/sha256/" + config_digest.split(":")[1]: config_bytes,
                "blobs/sha256/" + manifest_digest.split(":")[1]: manifest_bytes}
    patched = archive.with_suffix(".patched.tar")
    with tarfile.open(archive) as src, tarfile.open(patched, "w") as out:
        for member in src.getmembers():
            if member.name in (manifest_name, config_name) or member.name in replaced:
                continue
            out.addfile(member, src.extractfile(member))
        for name, data in replaced.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    patched.replace(archive)


def build(ref: str, workdir: Path) -> str:
    contract = parse_dockerfile(REPO / "Dockerfile.worker")
    cache = _cache()
    cache.mkdir(parents=True, exist_ok=True)
    base = base_rootfs(cache)
    deps = deps_rootfs(cache, base, wheelhouse(cache))
    rootfs = workdir / "worker-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    _run(["cp", "-a", str(deps), str(rootfs)])
    try:
        assemble(rootfs, project_wheel(workdir / "dist"), contract)
        return import_image(rootfs, ref, contract, workdir)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        shutil.rmtree(workdir / "dist", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="image reference, e.g. local/embedjob-worker:e2e")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")),
                        help="scratch folder for the image's root filesystem (~1.5 GB)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("realnode_image: needs root (chroot, chown, containerd)")
    print(build(args.ref, args.workdir))


if __name__ == "__main__":
    main()
