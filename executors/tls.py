"""Dask closed: TLS with Calypso's own certificate between client, scheduler and workers.

Every cluster Calypso starts (local, the one ``calypso serve`` keeps, SLURM) listens on
``tls://`` only and asks each peer for a certificate signed by its own authority: the
certificate in ``<home>/tls/dask.pem``, made on first use (mode 0600). A process that
cannot read that file cannot submit work, join as a worker or read results. The file
holds one self-signed certificate and its private key and serves every role (client,
scheduler, worker), which is what Dask's own ``Security.temporary()`` does in memory;
being a file, it also reaches the flow runs ``calypso serve`` starts and the SLURM jobs
(the nodes read it where they mount Calypso's home).

An OpenStack cluster gets a certificate of its own (see ``executors/openstack.py``):
dask-cloudprovider can only hand it to the VMs through their user data.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from calypso.errors import ConfigurationError
from calypso.private_files import create_private_file, read_private_file
from calypso.settings import ExecutorSettings

if TYPE_CHECKING:
    from distributed import Security
ROLES = ("client", "scheduler", "worker")
VALID_DAYS = 3650  # a renewed certificate would lock out the clusters running with the old
COMMON_NAME = "calypso-dask"


def certificate_path(home: Path) -> Path:
    return home / "tls" / "dask.pem"


def new_certificate(days: int = VALID_DAYS) -> bytes:
    """A private key and its self-signed certificate (PEM, key first)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of nodes drift
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(COMMON_NAME)]), False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem_key + certificate.public_bytes(serialization.Encoding.PEM)


def _expired(pem: bytes) -> bool:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return True  # no certificate in it: made anew
    return certificate.not_valid_after_utc <= datetime.datetime.now(datetime.UTC)


def ensure_certificate(path: Path) -> Path:
    """``path``, holding a valid key and certificate: made when missing or expired."""
    if not path.exists():
        create_private_file(path, new_certificate())
    if _expired(read_private_file(path)):
        # Clusters still running with the old one refuse the new: restart them.
        create_private_file(path, new_certificate(), replace=True)
    return path


def security_from_file(path: Path) -> Security:
    """Dask's security with the certificate in ``path`` for every role, TLS required."""
    from distributed import Security

    pem = str(path)
    return Security(
        require_encryption=True,
        tls_ca_file=pem,
        **{f"tls_{role}_{part}": pem for role in ROLES for part in ("cert", "key")},
    )


def calypso_security(home: Path | None = None) -> Security:
    """The security of Calypso's clusters: the certificate in ``home`` (default: the
    settings' home), made on first use."""
    if home is None:
        from calypso.settings import load_settings

        home = load_settings().home
    return security_from_file(ensure_certificate(certificate_path(home)))


def cluster_security(executor: ExecutorSettings, home: Path | None = None) -> Security | None:
    """:func:`calypso_security`, or None when ``executor.tls`` is off."""
    return calypso_security(home) if executor.tls else None


def require_tls_address(address: str, security: Security | None) -> str:
    """``address``, refused with a message when TLS is on and it is not ``tls://``: Dask's
    own error comes later and says only that encryption is required."""
    if security is not None and not address.startswith("tls://"):
        raise ConfigurationError(
            f"the Dask scheduler address {address} is not tls://: Calypso's clusters use TLS "
            "with Calypso's certificate (docs/operations/clusters.md); give tls://HOST:PORT, or "
            "set CALYPSO_EXECUTOR__TLS=false to use a scheduler without TLS"
        )
    return address
