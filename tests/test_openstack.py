"""What Calypso hands to dask-cloudprovider for OpenStack (no OpenStack here).

The VMs are never created: the cluster object is built without starting, and
the cloud-init user data a worker VM would get is rendered by dask-cloudprovider
itself and searched for the credential.
"""

from __future__ import annotations

import asyncio
import re

import dask
import pytest

from calypso.errors import ConfigurationError
from calypso.executors.openstack import cluster_arguments, make_cluster, running_cluster_address
from calypso.settings import load_settings

pytest.importorskip("dask_cloudprovider.openstack")
SECRET = "app-credential-secret-7f3a9"
OPENSTACK = {
    "auth_url": "https://keystone.example.org:5000/v3",
    "region": "RegionOne",
    "application_credential_id": "4b1c0de",
    "application_credential_secret": SECRET,
    "flavor": "m2.xlarge",
    "image": "ubuntu-24.04-docker",
    "docker_image": "registry.example.org/calypso:1.0",
    "network_id": "net-beamlines",
    "keypair_name": "calypso",
    "minimum_workers": 1,
    "maximum_workers": 12,
}


@pytest.fixture(autouse=True)
def dask_config_restored():
    """dask-cloudprovider switches this process's Dask configuration to TLS when it builds
    a cluster; the clusters of later tests must not inherit that."""
    import copy

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def settings(**openstack):
    return load_settings(
        executor={"kind": "openstack", "openstack": OPENSTACK | openstack},
        path_map={"/data/visitor": "/mnt/visitor"},
    )


def worker_user_data(cluster) -> str:
    from dask_cloudprovider.openstack.instances import OpenStackWorker

    cluster.scheduler_internal_ip = cluster.scheduler_external_ip = "10.0.0.5"
    cluster.scheduler_port = 8786
    worker = OpenStackWorker("tcp://10.0.0.5:8786", **cluster.worker_options)
    return cluster.render_process_cloud_init(worker)


def inherited_config(user_data: str) -> str:
    """The Dask configuration dask-cloudprovider copies into the VM (base64 JSON)."""
    [encoded] = re.findall(r'DASK_INTERNAL_INHERIT_CONFIG="([^"]+)"', user_data)
    return str(dask.config.deserialize(encoded))


def test_what_the_workers_get():
    arguments = cluster_arguments(settings(), ["calypso.tasks.diffraction"])
    assert arguments["size"] == "m2.xlarge" and arguments["image"] == "ubuntu-24.04-docker"
    assert arguments["docker_image"] == "registry.example.org/calypso:1.0"
    assert arguments["worker_options"] == {"preload": ["calypso.tasks.diffraction"], "nthreads": 1}
    assert arguments["n_workers"] == 1
    assert arguments["env_vars"]["NUMBA_NUM_THREADS"] == "1"
    assert arguments["env_vars"]["CALYPSO_PATH_MAP"] == '{"/data/visitor": "/mnt/visitor"}'

    async def build():
        cluster = make_cluster(settings(), ["calypso.tasks.diffraction"], asynchronous=True)
        return cluster, worker_user_data(cluster)

    cluster, user_data = asyncio.run(build())
    # The VM code gets the network and the credential it needs ...
    assert cluster.config["network_id"] == "net-beamlines"
    assert cluster.config["application_credential_secret"] == SECRET
    # ... the worker command preloads the technique code, in Calypso's image ...
    assert "distributed.cli.dask_spec tcp://10.0.0.5:8786" in user_data
    assert '"preload": ["calypso.tasks.diffraction"]' in user_data
    assert "registry.example.org/calypso:1.0" in user_data
    # ... and the credential is nowhere in the user data, encoded or not.
    assert SECRET not in user_data and SECRET not in inherited_config(user_data)


def test_without_the_guard_the_secret_would_leak_into_user_data():
    """dask-cloudprovider's own way (credentials in Dask's config) leaks: why the guard."""
    from dask_cloudprovider.openstack import OpenStackCluster

    async def build():
        with dask.config.set({"cloudprovider.openstack": {**OPENSTACK, "network_id": "n"}}):
            cluster = OpenStackCluster(asynchronous=True, n_workers=0)
            return worker_user_data(cluster)

    assert SECRET in inherited_config(asyncio.run(build()))


def test_missing_credentials_and_no_running_cluster_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("CALYPSO_HOME", str(tmp_path))
    with pytest.raises(ConfigurationError, match="APPLICATION_CREDENTIAL_SECRET"):
        make_cluster(settings(application_credential_secret=None), [])
    with pytest.raises(ConfigurationError, match="calypso cluster up openstack"):
        running_cluster_address(load_settings())
