"""The fixture's certificates, made with the openssl CLI (present wherever Debian is): one CA signs every
serving certificate (kube-apiserver, Kueue's webhooks and metrics, the kube components' own HTTPS), and a
separate key pair signs service-account tokens. ECDSA P-256 keys: generated in milliseconds."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(path: Path) -> None:
    # PKCS#8 PEM: what Go's tls.X509KeyPair and every component here read.
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


def make_ca(d: Path, name: str = "llmctl-test-ca") -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    key, crt = d / "ca.key", d / "ca.crt"
    _key(key)
    _run("req", "-x509", "-new", "-key", str(key), "-out", str(crt), "-days", "3650", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return crt, key


def issue(d: Path, name: str, ca: tuple[Path, Path], *, ips=("127.0.0.1",), dns=("localhost",)) -> tuple[Path, Path]:
    """A serving certificate `<name>.crt`/`<name>.key` in d for the given IPs and DNS names."""
    d.mkdir(parents=True, exist_ok=True)
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    _key(key)
    _run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=d)
    san = ",".join([*(f"IP:{i}" for i in ips), *(f"DNS:{n}" for n in dns)])
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-out", str(crt), "-days", "3650", "-extfile", str(ext), cwd=d)
    csr.unlink()
    ext.unlink()
    return crt, key


def signing_keypair(d: Path, name: str = "sa") -> tuple[Path, Path]:
    """(public, private) PEM files for the service-account token signer."""
    key, pub = d / f"{name}.key", d / f"{name}.pub"
    _key(key)
    _run("pkey", "-in", str(key), "-pubout", "-out", str(pub), cwd=d)
    return pub, key
