"""``calypso cluster``: a long-lived Dask cluster on OpenStack VMs that flow runs use by
address."""

from __future__ import annotations

import argparse

from calypso.errors import ConfigurationError
from calypso.flows.techniques import TECHNIQUES
from calypso.settings import load_settings


def add_commands(commands: argparse._SubParsersAction) -> None:
    cluster = commands.add_parser(
        "cluster", help="a long-lived Dask cluster (OpenStack VMs) that flow runs use by address"
    )
    cluster_commands = cluster.add_subparsers(title="cluster commands", metavar="ACTION")
    up = cluster_commands.add_parser("up", help="start it and keep it (Ctrl-C stops it)")
    up.add_argument("provider", choices=["openstack"])
    up.set_defaults(handler=command_cluster_up)
    status = cluster_commands.add_parser("status", help="its address and workers")
    status.set_defaults(handler=command_cluster_status)
    down = cluster_commands.add_parser("down", help="stop it and its VMs")
    down.set_defaults(handler=command_cluster_down)
    kept = cluster_commands.add_parser(
        "kept",
        help="the local Prefect server and Dask clusters `calypso run` keeps for the next "
        "commands (this home's), or --stop them",
    )
    kept.add_argument("--stop", action="store_true", help="stop them now (they stop when unused)")
    kept.set_defaults(handler=command_cluster_kept)


def command_cluster_up(args: argparse.Namespace) -> int:
    from calypso.executors.openstack import cluster_up

    settings = load_settings()
    # Its workers serve every technique, so they import every technique's code as they start.
    cluster_up(settings, [technique.task_module for technique in TECHNIQUES.values()])
    return 0


def command_cluster_status(args: argparse.Namespace) -> int:
    from distributed import Client

    from calypso.executors.openstack import running_cluster_address, running_cluster_security

    settings = load_settings()
    address = running_cluster_address(settings)
    security = running_cluster_security(settings) if settings.executor.tls else None
    try:
        with Client(address, timeout=10, security=security) as client:
            workers = client.scheduler_info()["workers"]
    except OSError as exc:
        raise ConfigurationError(f"the cluster at {address} does not answer: {exc}") from None
    print(f"OpenStack Dask cluster at {address}: {len(workers)} workers")
    for name, worker in sorted(workers.items()):
        print(f"  {name}  {worker.get('nthreads')} threads")
    return 0


def command_cluster_down(args: argparse.Namespace) -> int:
    from calypso.executors.openstack import cluster_down

    print(cluster_down(load_settings()))
    return 0


def command_cluster_kept(args: argparse.Namespace) -> int:
    """The home's kept local services (executors/kept.py, flows/local_server.py)."""
    import os
    import signal

    from calypso.executors.kept import kept_clusters, read_address
    from calypso.flows.local_server import address_path

    home = load_settings().home
    server = read_address(address_path(home))
    services = [("local Prefect server", server["url"], server)] if server else []
    services += [("local Dask cluster", c["address"], c) for c in kept_clusters(home)]
    if not services:
        print(f"none kept in {home}")
    for what, address, known in services:
        if args.stop:
            os.kill(int(known["pid"]), signal.SIGTERM)  # its keeper closes it, then goes
            print(f"stopping the {what} at {address}")
        else:
            idle = f", unused for {known['idle_s']} s" if "idle_s" in known else ""
            print(f"{what} at {address} (keeper pid {known['pid']}{idle})")
    if services and not args.stop:
        print(f"(in {home}: `calypso cluster kept --stop` stops them now)")
    return 0
