"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager.

The binaries come from ``$KUBEBUILDER_ASSETS`` (controller-runtime's envtest convention; a user
gets them with ``setup-envtest use``, CI from ``../shared/envtest/install.sh``). Everything runs
on loopback from a fresh temporary folder. The API server authorizes with RBAC and enforces
``OwnerReferencesPermissionEnforcement``; the controller-manager runs the garbage collector, the
namespace controller and the ServiceAccount controller, so owned pods really are collected and
ServiceAccount tokens really are issued through the TokenRequest API.

No container runs here: a test kubelet (tests/kubelet.py) plays the node through the API.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADMISSION_PLUGINS = "OwnerReferencesPermissionEnforcement"
KCM_CONTROLLERS = "garbagecollector,serviceaccount,namespace"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name,
          issuer_key: rsa.RSAPrivateKey, *, ca: bool = False,
          usage: x509.ObjectIdentifier | None = None,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(folder: Path) -> None:
    """A CA, the API server's serving certificate, an admin client (system:masters), SA keys."""
    ca_key, server_key, admin_key, sa_key = _key(), _key(), _key(), _key()
    ca_name = _name("envtest-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    server = _cert(_name("kube-apiserver"), server_key, ca_name, ca_key,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    admin = _cert(_name("envtest-admin", "system:masters"), admin_key, ca_name, ca_key,
                  usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem), "ca.key": _pem_key(ca_key),
        "apiserver.crt": server.public_bytes(pem), "apiserver.key": _pem_key(server_key),
        "admin.crt": admin.public_bytes(pem), "admin.key": _pem_key(admin_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


def kubeconfig(server: str, ca_pem: bytes, *, user: dict[str, str],
               namespace: str = "default") -> dict:
    """A kubeconfig document for one cluster and one user."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
        "clusters": [{"name": "envtest", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "envtest", "context": {
            "cluster": "envtest", "user": "user", "namespace": namespace}}],
    }


@dataclass
class ControlPlane:
    """A running control plane; ``kubeconfig`` is the admin's (system:masters)."""

    assets: Path
    folder: Path
    port: int = 0
    etcd_url: str = ""
    apiserver_args: tuple[str, ...] = ()
    """Extra kube-apiserver flags (e.g. no watch cache, so etcd compaction reaches watches)."""
    controllers: bool = True
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    apiserver_args: list[str] = field(default_factory=list)
    """Extra kube-apiserver flags (the scale bench turns on an audit log)."""

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    @property
    def ca_pem(self) -> bytes:
        return (self.folder / "ca.crt").read_bytes()

    def kubectl(self, *args: str, input: str | None = None,
                kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the assets' kubectl against this control plane."""
        cmd = [str(self.assets / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig),
               *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def token_kubeconfig(self, token: str, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        doc = kubeconfig(self.server, self.ca_pem, user={"token": token}, namespace=namespace)
        path.write_text(yaml.safe_dump(doc))
        return path

    def start(self, timeout: float = 120.0) -> None:
        write_pki(self.folder)
        etcd_port, peer_port, self.port = _free_port(), _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        admin = {"client-certificate-data": _b64(self.folder / "admin.crt"),
                 "client-key-data": _b64(self.folder / "admin.key")}
        self.kubeconfig.write_text(yaml.safe_dump(
            kubeconfig(self.server, self.ca_pem, user=admin)))
        self._spawn("etcd", [
            "--name", "envtest", "--data-dir", str(self.folder / "etcd-data"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"envtest=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(2 << 30), "--log-level", "warn"])
        f = self.folder
        self._spawn("kube-apiserver", [
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.port),
            "--tls-cert-file", str(f / "apiserver.crt"),
            "--tls-private-key-file", str(f / "apiserver.key"),
            "--client-ca-file", str(f / "ca.crt"), "--authorization-mode", "RBAC",
            "--service-account-issuer", self.server,
            "--service-account-key-file", str(f / "sa.pub"),
            "--service-account-signing-key-file", str(f / "sa.key"),
            "--service-cluster-ip-range", "10.0.0.0/24", "--endpoint-reconciler-type", "none",
            "--enable-admission-plugins", ADMISSION_PLUGINS, *self.apiserver_args])
        self._wait_ready(timeout)
        if self.controllers and (self.assets / "kube-controller-manager").exists():
            self._spawn("kube-controller-manager", [
                "--kubeconfig", str(self.kubeconfig),
                "--authentication-kubeconfig", str(self.kubeconfig),
                "--authorization-kubeconfig", str(self.kubeconfig),
                "--controllers", KCM_CONTROLLERS,
                "--service-account-private-key-file", str(f / "sa.key"),
                "--root-ca-file", str(f / "ca.crt"), "--leader-elect=false",
                "--bind-address", "127.0.0.1", "--secure-port", "0"])

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now (what the API server does every 5 minutes):
        watches from an older resourceVersion then get 410 Gone. Returns the revision."""
        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(f"{self.etcd_url}{path}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())

        revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def stop(self) -> None:
        """Stop in reverse start order: SIGTERM, then SIGKILL after 5 s."""
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        self.processes[name] = subprocess.Popen(
            [str(self.assets / name), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        context.load_cert_chain(self.folder / "admin.crt", self.folder / "admin.key")
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n"
                                       + self.log_tail(name))
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=context,
                                            timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kube-apiserver not ready in time:\n"
                                   + self.log_tail("kube-apiserver"))
            time.sleep(0.2)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assets_folder() -> Path | None:
    """``$KUBEBUILDER_ASSETS`` if it holds etcd, kube-apiserver and kubectl."""
    value = os.environ.get("KUBEBUILDER_ASSETS")
    if not value:
        return None
    folder = Path(value)
    missing = [b for b in ("etcd", "kube-apiserver", "kubectl") if not (folder / b).exists()]
    if missing:
        raise RuntimeError(f"KUBEBUILDER_ASSETS={folder} lacks {', '.join(missing)}")
    return folder


def start_control_plane(assets: Path, apiserver_args: tuple[str, ...] = (),
                        controllers: bool = True) -> ControlPlane:
    folder = Path(tempfile.mkdtemp(prefix="embedjob-envtest-"))
    plane = ControlPlane(assets=assets, folder=folder, apiserver_args=apiserver_args,
                         controllers=controllers)
    try:
        plane.start()
    except BaseException:
        plane.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return plane
