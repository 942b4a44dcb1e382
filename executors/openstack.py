"""A long-lived, adaptive Dask cluster on OpenStack VMs (dask-cloudprovider).

A VM takes minutes to boot, so OpenStack is not a cluster per flow run:
``calypso cluster up openstack`` starts the scheduler VM and adapts workers
between ``minimum_workers`` and ``maximum_workers`` for as long as it runs,
and flow runs use it by address (executor kind ``openstack`` reads the address
that ``up`` wrote; ``calypso cluster status|down`` look at it and stop it).

dask-cloudprovider reads its settings from Dask's configuration and copies all
non-default Dask configuration into every VM's cloud-init user data
(``DASK_INTERNAL_INHERIT_CONFIG``), which anyone able to read the VM's metadata
can see. Calypso therefore never puts the application credential into Dask's
configuration: :class:`CalypsoOpenStackCluster` hands it to dask-cloudprovider's
VM code directly.

The cluster is closed with TLS like Calypso's others, but with a certificate of its own,
made at each ``cluster up`` (``<home>/clusters/openstack-tls.pem``, 0600): the VMs can
only get it through their user data, so whoever reads the project's instance metadata
could join this cluster, and no other. Flow runs and ``cluster status`` present it; the
scheduler's dashboard listens on the scheduler VM's loopback (an SSH tunnel reaches it).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, ClassVar

from calypso.errors import ConfigurationError
from calypso.settings import CalypsoSettings, OpenStackSettings


def public_config(openstack: OpenStackSettings) -> dict[str, Any]:
    """dask-cloudprovider's ``cloudprovider.openstack`` configuration, without secrets."""
    return {
        "auth_url": openstack.auth_url,
        "region": openstack.region,
        "network_id": openstack.network_id,
        "keypair_name": openstack.keypair_name,
        "security_group": openstack.security_group,
        "external_network_id": openstack.external_network_id,
        "create_floating_ip": openstack.create_floating_ip,
        "size": openstack.flavor,
        "image": openstack.image,
        "docker_image": openstack.docker_image,
    }


def secret_config(openstack: OpenStackSettings) -> dict[str, Any]:
    secret = openstack.application_credential_secret
    return {
        "application_credential_id": openstack.application_credential_id,
        "application_credential_secret": secret.get_secret_value() if secret else None,
    }


def cluster_arguments(settings: CalypsoSettings, technique_modules: list[str]) -> dict[str, Any]:
    """What Calypso hands to ``OpenStackCluster``: VM flavour and image, Calypso's Docker
    image, the worker's command options (the technique code preloaded, one thread) and
    its environment (the same as a local worker's)."""
    from calypso.executors.dask import worker_environment

    openstack = settings.executor.openstack
    environment = {k: str(v) for k, v in worker_environment(openstack.worker_threads).items()}
    if settings.path_map:
        environment["CALYPSO_PATH_MAP"] = json.dumps(settings.path_map)
    return {
        "region": openstack.region,
        "size": openstack.flavor,
        "image": openstack.image,
        "docker_image": openstack.docker_image,
        "worker_threads": openstack.worker_threads,
        "n_workers": openstack.minimum_workers,
        "worker_options": {
            "preload": list(technique_modules),
            "nthreads": openstack.worker_threads,
        },
        "env_vars": environment,
        "bootstrap": True,
        "scheduler_options": {"dashboard_address": "127.0.0.1:8787"},
    }


def adaptive_bounds(openstack: OpenStackSettings) -> dict[str, int]:
    return {"minimum": openstack.minimum_workers, "maximum": openstack.maximum_workers}


def _cluster_class():
    from dask_cloudprovider.openstack import OpenStackCluster

    class CalypsoOpenStackCluster(OpenStackCluster):
        """OpenStackCluster whose VMs get the credential from Calypso, not Dask's config."""

        _calypso_secrets: ClassVar[dict[str, Any]] = {}

        @property
        def config(self) -> dict[str, Any]:
            return {**self._public_config, **self._calypso_secrets}

        @config.setter
        def config(self, value: dict[str, Any]) -> None:
            self._public_config = dict(value)

    return CalypsoOpenStackCluster


def make_cluster(settings: CalypsoSettings, technique_modules: list[str], **extra: Any):
    """The cluster object (``asynchronous=True`` in ``extra`` builds it without starting),
    with a new certificate of its own (TLS) unless ``executor.tls`` is off."""
    import dask

    openstack = settings.executor.openstack
    missing = [
        name
        for name in ("auth_url", "application_credential_id", "network_id")
        if not getattr(openstack, name)
    ]
    if missing or openstack.application_credential_secret is None:
        names = [f"CALYPSO_EXECUTOR__OPENSTACK__{n.upper()}" for n in missing]
        if openstack.application_credential_secret is None:
            names.append("CALYPSO_EXECUTOR__OPENSTACK__APPLICATION_CREDENTIAL_SECRET")
        raise ConfigurationError(f"an OpenStack cluster needs {', '.join(names)}")
    cls = _cluster_class()
    cls._calypso_secrets = secret_config(openstack)
    security = new_cluster_security(settings) if settings.executor.tls else False
    # Only the public part is Dask configuration, so only it reaches the user data.
    with dask.config.set({"cloudprovider.openstack": public_config(openstack)}):
        return cls(**cluster_arguments(settings, technique_modules), security=security, **extra)


def state_file(settings: CalypsoSettings) -> Path:
    return settings.home / "clusters" / "openstack.json"


def certificate_file(settings: CalypsoSettings) -> Path:
    return settings.home / "clusters" / "openstack-tls.pem"


def new_cluster_security(settings: CalypsoSettings):
    """A new certificate for the cluster about to start, kept for its clients, and the
    ``Security`` that carries it inline: dask-cloudprovider copies it into the VMs' user
    data, where a file name would mean nothing."""
    from distributed import Security

    from calypso.executors.tls import ROLES, new_certificate
    from calypso.private_files import create_private_file

    pem = new_certificate()
    create_private_file(certificate_file(settings), pem, replace=True)
    text = pem.decode()
    return Security(
        require_encryption=True,
        tls_ca_file=text,
        **{f"tls_{role}_{part}": text for role in ROLES for part in ("cert", "key")},
    )


def running_cluster_security(settings: CalypsoSettings | None = None):
    """The ``Security`` a client of the running cluster presents (its certificate file)."""
    from calypso.executors.tls import security_from_file
    from calypso.settings import load_settings

    path = certificate_file(settings or load_settings())
    if not path.is_file():
        raise ConfigurationError(
            f"no certificate of the OpenStack cluster at {path}: restart it with "
            "`calypso cluster up openstack` (which makes one)"
        )
    return security_from_file(path)


def running_cluster_address(settings: CalypsoSettings | None = None) -> str:
    from calypso.settings import load_settings

    path = state_file(settings or load_settings())
    try:
        return json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError):
        raise ConfigurationError(
            f"no OpenStack cluster is running ({path} is missing): start one with "
            "`calypso cluster up openstack`"
        ) from None


def cluster_up(settings: CalypsoSettings, technique_modules: list[str]) -> None:
    """Start the cluster, write its address, adapt until SIGTERM/Ctrl-C, then close it."""
    cluster = make_cluster(settings, technique_modules)
    cluster.adapt(**adaptive_bounds(settings.executor.openstack))
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"address": cluster.scheduler_address, "pid": os.getpid(), "started": time.time()}
        )
    )
    print(f"OpenStack Dask cluster at {cluster.scheduler_address} (Ctrl-C stops it)", flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        path.unlink(missing_ok=True)
        cluster.close()


def cluster_down(settings: CalypsoSettings) -> str:
    path = state_file(settings)
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return "no OpenStack cluster is running"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return f"the cluster process {pid} had gone; forgot its address"
    return f"asked the cluster process {pid} to stop its VMs"
