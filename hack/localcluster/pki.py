"""Certificates made with the openssl CLI (nothing to install), and the admin kubeconfig document."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .errors import ClusterError

APISERVER_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "IP:10.96.0.1",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)
_LEAF = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
CLIENT_AUTH = _LEAF + "extendedKeyUsage=clientAuth\n"


def server_auth(sans: list[str] | tuple[str, ...]) -> str:
    """The openssl extensions of a serving certificate for `sans` (`IP:...`, `DNS:...`)."""
    return _LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(sans) + "\n"


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("the openssl command is missing (Debian package openssl)")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def make_ca(pki: Path, name: str, subject: str) -> None:
    """Writes a self-signed CA as NAME.key and NAME.crt."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "3650", "-sha256", "-subj", subject,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)  # fmt: skip


def signed_cert(pki: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """Writes NAME.key and NAME.crt, signed by CA.crt."""
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", subject,
             "-out", f"{name}.csr", cwd=pki)  # fmt: skip
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", f"0x{os.urandom(8).hex()}", "-days", "3650", "-sha256",
             "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)  # fmt: skip


def make_pki(pki: Path) -> None:
    """A fresh CA, the apiserver serving cert (SANs 127.0.0.1/localhost), an admin client cert and the SA keys."""
    pki.mkdir(parents=True, exist_ok=True)
    make_ca(pki, "ca", "/CN=k2-local-ca")
    make_ca(pki, "front-proxy-ca", "/CN=k2-local-front-proxy-ca")
    signed_cert(pki, "apiserver", "/CN=kube-apiserver", server_auth(APISERVER_SANS))
    signed_cert(pki, "admin", "/O=system:masters/CN=k2-admin", CLIENT_AUTH)
    # The apiserver's identity towards kubelets (logs, exec, port-forward).
    signed_cert(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", CLIENT_AUTH)
    # The aggregation layer's client identity; its CA also lets the controllers read the request-header settings.
    signed_cert(pki, "front-proxy-client", "/CN=front-proxy-client", CLIENT_AUTH, ca="front-proxy-ca")
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig_document(
    server: str, ca_pem: str, cert_pem: str, key_pem: str, user: str = "k2-admin"
) -> dict[str, Any]:
    """A kubeconfig with the CA and client certificate embedded (base64), so it can be copied anywhere."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k2-local", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [
            {"name": user, "user": {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)}}
        ],
        "contexts": [{"name": "k2-local", "context": {"cluster": "k2-local", "user": user}}],
        "current-context": "k2-local",
    }


def kubeconfig_for(server: str, pki: Path, name: str, user: str = "k2-admin") -> dict[str, Any]:
    """The kubeconfig of the client certificate NAME.crt/NAME.key in `pki`, trusting `pki`/ca.crt."""
    ca, cert, key = ((pki / file).read_text() for file in ("ca.crt", f"{name}.crt", f"{name}.key"))
    return kubeconfig_document(server, ca, cert, key, user)
