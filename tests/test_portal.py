"""The portal (issue #21) with real servers on loopback: the portal itself (uvicorn), a
real OpenLDAP directory and a real OpenID Connect provider (tests/test_isolation.py's),
the session's Prefect server, a Dask cluster, moto's S3 server, and headless Chromium.

Alice (LDAP, proposal ih0001) launches a diffraction run from the form, follows it to
completion, reruns it with another parameter and exports it; her processed file opens in
h5web and its plot is checked on a screenshot. Bob (OpenID Connect, ih0002) gets 404 on
her pages, file contents, run and export; '..', encoded '..' and symlinks are refused.
"""

from __future__ import annotations

import http.client
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import httpx
import pytest

from tests.processes import wait_until
from tests.test_export import S3Server
from tests.test_isolation import PASSWORDS, Facility, _access_env, directory, issuer

__all__ = ["directory", "issuer"]  # the directory and provider fixtures, shared

pytestmark = pytest.mark.slow
BUCKET = "portal-exports"


@pytest.fixture(scope="module")
def portal(tmp_path_factory, directory, issuer, scheduler, loopback):
    """The portal on a free loopback port, in this process (uvicorn in a thread)."""
    import uvicorn

    from calypso.flows.portal import create_app
    from calypso.settings import load_settings

    base = tmp_path_factory.mktemp("portal")
    facility = Facility(base)
    s3 = S3Server(loopback, base / "moto.log")
    s3.bucket(BUCKET)
    with pytest.MonkeyPatch.context() as env:
        _access_env(env, directory, issuer, [facility.visitor])
        for name, value in s3.env().items():
            env.setenv(name, value)
        env.setenv("CALYPSO_EXPORT__DEFAULT_TARGET", f"s3://{BUCKET}/exports")
        env.setenv("CALYPSO_CATALOGUE__PATH", str(base / "catalogue.sqlite"))
        env.setenv("CALYPSO_EXECUTOR__KIND", "address")
        env.setenv("CALYPSO_EXECUTOR__ADDRESS", scheduler)
        settings = load_settings()
        port = loopback.free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        loopback.wait_for_http(f"{url}/health", timeout=30)
        yield SimpleNamespace(url=url, port=port, facility=facility, settings=settings, s3=s3)
        server.should_exit = True
        thread.join(timeout=20)
        s3.close()


def signed_in_with_ldap(portal, name: str) -> httpx.Client:
    client = httpx.Client(base_url=portal.url, timeout=30)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text)[1]
    form = {"username": name, "password": PASSWORDS[name], "csrf": token}
    answer = client.post("/signin", data=form)
    assert answer.status_code == 303, answer.text
    return client


def signed_in_with_oidc(portal, name: str) -> httpx.Client:
    """The browser's way: to the provider, the user signs in there, back with a code."""
    client = httpx.Client(base_url=portal.url, timeout=30)
    to_provider = client.get("/signin/oidc")
    assert to_provider.status_code == 303, to_provider.text
    back = httpx.post(to_provider.headers["location"], data={"sub": name})
    assert back.status_code == 302, back.text
    assert client.get(back.headers["location"]).status_code == 303
    return client


def csrf(client: httpx.Client, path: str = "/") -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)[1]


def raw_get(portal, client: httpx.Client, path: str) -> tuple[int, str]:
    """A GET with the path sent exactly as written ('..' and '%2e%2e' untouched: httpx
    would normalise them away)."""
    connection = http.client.HTTPConnection("127.0.0.1", portal.port, timeout=30)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    connection.request("GET", path, headers={"Cookie": cookie})
    response = connection.getresponse()
    answer = response.status, response.read().decode()
    connection.close()
    return answer


def portal_path(portal, path) -> str:
    return str(path.relative_to(portal.facility.visitor))


@pytest.fixture(scope="module")
def alice_run(portal):
    """Alice launches a diffraction run on her dataset from the form and follows it."""
    alice = signed_in_with_ldap(portal, "alice")
    f = portal.facility
    raw = portal_path(portal, f.a_raw)
    form = alice.get(f"/launch/diffraction?input={quote(raw)}")
    assert form.status_code == 200 and 'name="npt"' in form.text
    values = {"poni": str(f.poni), "mask": str(f.mask), "npt": "100"}
    launch_id = launch(alice, raw, values)
    state = follow(alice, launch_id)
    return SimpleNamespace(client=alice, raw=raw, launch_id=launch_id, **state)


def launch(client: httpx.Client, raw: str, values: dict, rerun: str | None = None) -> str:
    form = {"csrf": csrf(client), "input": raw, **values} | ({"rerun": rerun} if rerun else {})
    answer = client.post("/launch/diffraction", data=form)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"].rsplit("/", 1)[-1]


def follow(client: httpx.Client, launch_id: str) -> dict:
    def finished():
        state = client.get(f"/api/launches/{launch_id}").json()
        return state if state["state"] in ("completed", "failed") else None

    state = wait_until(finished, 120, f"launch {launch_id}", interval=0.3)
    assert state["state"] == "completed", state
    return state


# -- sign-in, and what nobody may see ----------------------------------------------------


def test_sign_in_and_only_their_proposals(portal):
    anonymous = httpx.Client(base_url=portal.url)
    assert anonymous.get("/").status_code == 303  # to the sign-in page
    assert anonymous.get("/h5grove/meta?file=ih0001/x.h5").status_code == 401
    token = re.search(r'name="csrf" value="([^"]+)"', anonymous.get("/signin").text)[1]
    wrong = anonymous.post(
        "/signin", data={"username": "alice", "password": "wrong", "csrf": token}
    )
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    # Another site's form signs nobody in (its post carries no token of this browser's).
    elsewhere = httpx.post(
        f"{portal.url}/signin", data={"username": "alice", "password": PASSWORDS["alice"]}
    )
    assert elsewhere.status_code == 403 and "calypso_portal" not in elsewhere.cookies
    alice = signed_in_with_ldap(portal, "alice")
    home = alice.get("/").text
    assert 'href="/data/ih0001"' in home and "ih0002" not in home
    bob = signed_in_with_oidc(portal, "bob")
    assert 'href="/data/ih0002"' in bob.get("/").text and "ih0001" not in bob.get("/").text
    # A forged cookie is not a session.
    forged = httpx.Client(base_url=portal.url, cookies={"calypso_portal": "eyJpZGVudGl0eSI6e30="})
    assert forged.get("/").status_code == 303
    # Signing out needs the session's form token.
    assert alice.post("/signout", data={"csrf": "not-it"}).status_code == 403


def test_the_portal_needs_data_roots(portal, monkeypatch, capsys):
    from calypso.flows.cli import main

    monkeypatch.delenv("CALYPSO_DATA_ROOTS")
    assert main(["portal"]) == 2
    assert "calypso portal refuses to start without data roots" in capsys.readouterr().err


def test_the_portal_knows_the_port_it_listens_on(portal, monkeypatch):
    """The links a launched run's Prefect page gets pointed at the settings' port (8400),
    not the one given with --port."""
    import uvicorn

    from calypso.flows.cli import main
    from calypso.flows.portal import app

    made = []
    monkeypatch.setattr(app, "create_app", lambda settings: made.append(settings) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    assert main(["portal", "--port", "8481", "--host", "127.0.0.1"]) == 0
    assert (made[0].portal.host, made[0].portal.port) == ("127.0.0.1", 8481)


def test_paths_out_of_the_proposal_are_refused(portal):
    f = portal.facility
    alice = signed_in_with_ldap(portal, "alice")
    mine = portal_path(portal, f.a_raw / "CeO2_0001.h5")
    assert alice.get(f"/h5grove/meta?file={quote(mine)}&path=/").status_code == 200
    session = f"ih0001/id00/{f.session}"
    theirs = f"id00/{f.session}/RAW_DATA/CeO2/CeO2_0001/CeO2_0001.h5"
    for path in [
        f"/folder/{session}/../../../ih0002/id00",
        f"/view/{session}/%2e%2e/%2e%2e/%2e%2e/ih0002/{theirs}",
        f"/view/{session}/%252e%252e/%252e%252e/%252e%252e/ih0002/{theirs}",
        f"/h5grove/data?file=ih0001/..%2F..%2Fih0002/{quote(theirs)}&path=/",
        f"/h5grove/meta?file={quote(portal_path(portal, f.symlink / 'CeO2_0001.h5'))}",
        f"/files/{portal_path(portal, f.symlink / 'CeO2_0001.h5')}",
        # A's file whose detector data is a virtual dataset of B's frames
        f"/h5grove/meta?file={quote(portal_path(portal, f.vds / 'CeO2_0099.h5'))}",
        f"/h5grove/meta?file={quote(portal_path(portal, f.linked / 'CeO2_0097.h5'))}",
    ]:
        status, body = raw_get(portal, alice, path)
        assert status == 403 and "refused" in body, (path, status, body[:500])
    assert alice.get(f"/h5grove/meta?file=ih0002/{quote(theirs)}").status_code == 404
    assert alice.get("/data/ih0002").status_code == 404
    listing = alice.get(f"/folder/{portal_path(portal, f.symlink.parent)}").text
    assert "CeO2_0098 (a link out of the proposal: not shown)" in listing


def test_what_hdf5_would_open_behind_a_file_is_checked_each_time(portal, tmp_path):
    """A member of a proposal writes HDF5 files there that make HDF5 open another
    proposal's files, or Calypso's own secrets: each is refused (found by an adversarial
    sweep; each read the other proposal's data before)."""
    import os

    import h5py
    import numpy as np

    f = portal.facility
    alice = signed_in_with_ldap(portal, "alice")
    theirs = f.b_raw / "CeO2_0001.h5"
    secret = portal.settings.home / "portal-secret"
    folder = f.a_raw.parents[1] / "crafted"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()

    def meta(path: Path, inside: str = "/x", endpoint: str = "meta") -> int:
        name = quote(portal_path(portal, path))
        return alice.get(f"/h5grove/{endpoint}?file={name}&path={quote(inside)}").status_code

    # Raw bytes kept in an external file (H5Pset_external): any file, read as it is.
    with h5py.File(folder / "bytes.h5", "w") as h5:
        for name, target in (("x", theirs), ("y", secret)):
            size = target.stat().st_size
            h5.create_dataset(name, shape=(size,), dtype="u1", external=[(target, 0, size)])
    assert meta(folder / "bytes.h5", "/y", "data") == 403
    # '%b' is a virtual dataset's pattern only: an external link opens '%b.h5' as it is.
    with h5py.File(folder / "pattern.h5", "w") as h5:
        h5["x"] = h5py.ExternalLink("%b.h5", "/")
    (folder / "%b.h5").symlink_to(theirs)
    assert meta(folder / "pattern.h5") == 403
    # A symlinked file: HDF5 looks beside the symlink, not beside its target.
    with h5py.File(folder / "b" / "real.h5", "w") as h5:
        h5["x"] = h5py.ExternalLink("target.h5", "/")
    with h5py.File(folder / "b" / "target.h5", "w") as h5:
        h5["benign"] = np.arange(3)
    (folder / "a" / "link.h5").symlink_to(folder / "b" / "real.h5")
    (folder / "a" / "target.h5").symlink_to(theirs)
    assert meta(folder / "a" / "link.h5") == 403
    # A name in another proposal is refused whether it exists or not (no oracle), even
    # when HDF5 would fall back to a file of the same name beside.
    with h5py.File(folder / "CeO2_0001.h5", "w") as h5:
        h5["benign"] = np.arange(3)
    for target in (theirs, theirs.parent / "absent" / theirs.name):
        with h5py.File(folder / "named.h5", "w") as h5:
            h5["x"] = h5py.ExternalLink(str(target), "/")
        assert meta(folder / "named.h5", "/") == 403
    # A second name of their file (a hard link) says nothing of whose it is.
    os.link(theirs, folder / "second-name.h5")
    assert meta(folder / "second-name.h5", "/") == 403
    os.unlink(folder / "second-name.h5")
    # Checked, then swapped for a file of the same size and time: checked again.
    swapped = folder / "swapped.h5"
    with h5py.File(swapped, "w") as h5:
        h5["x"] = np.arange(3)
    with h5py.File(tmp_path / "evil.h5", "w") as h5:
        h5["x"] = h5py.ExternalLink(str(theirs), "/")
    size = max(swapped.stat().st_size, (tmp_path / "evil.h5").stat().st_size)
    for path in (swapped, tmp_path / "evil.h5"):
        os.truncate(path, size)
    before = swapped.stat()
    assert meta(swapped, "/x") == 200
    os.replace(tmp_path / "evil.h5", swapped)
    os.utime(swapped, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert meta(swapped, "/x") == 403
    # What h5grove cannot answer is a client's error, not a crash.
    with h5py.File(folder / "odd.h5", "w") as h5:
        h5["data"] = np.arange(10.0)
        h5["text"] = "words"
        h5["nowhere"] = h5py.ExternalLink("missing.h5", "/")
    (folder / "notes.h5").write_text("not HDF5")
    odd = quote(portal_path(portal, folder / "odd.h5"))
    for request, status in [
        (f"paths?file={odd}&path=/&resolve_links=all", 404),
        (f"data?file={odd}&path=/data&selection=zz", 400),
        (f"stats?file={odd}&path=/text", 400),
        (f"meta?file={quote(portal_path(portal, folder / 'notes.h5'))}&path=/", 422),
    ]:
        assert alice.get(f"/h5grove/{request}").status_code == status, request
    assert alice.get(f"/folder/{portal_path(portal, folder)}/{'x' * 300}").status_code == 404


@pytest.mark.parametrize("endpoint", ["files", "h5grove"])
def test_a_file_swapped_after_its_check_is_not_opened(portal, monkeypatch, endpoint):
    """Between the check and the open (h5grove's, a download's), a member of the proposal
    swaps the file for a symlink into another proposal: the kernel keeps the portal from
    opening it (a sweep's race; the check alone cannot close it)."""
    import h5py
    import numpy as np

    from calypso.flows.portal import h5 as endpoints
    from calypso.registry.access import landlock

    if not landlock.abi_version():
        pytest.skip("this kernel has no Landlock: the portal's reads are checked only")
    f = portal.facility
    alice = signed_in_with_ldap(portal, "alice")
    folder = f.a_raw.parents[1] / "swapped-later"
    folder.mkdir(exist_ok=True)
    mine = folder / f"mine-{endpoint}.h5"
    with h5py.File(mine, "w") as h5:
        h5["mine"] = np.arange(3)
    name = portal_path(portal, mine)
    url = f"/files/{name}" if endpoint == "files" else f"/h5grove/meta?file={quote(name)}&path=/"
    assert alice.get(url).status_code == 200
    checked = endpoints.readable_file

    def check_then_swap(*args):
        path = checked(*args)
        mine.unlink()
        mine.symlink_to(f.b_raw / "CeO2_0001.h5")
        return path

    monkeypatch.setattr(endpoints, "readable_file", check_then_swap)
    answer = alice.get(url)
    assert answer.status_code == 403, answer.text
    assert "a file outside proposal ih0001 was not opened" in answer.text
    assert "1.1" not in answer.text  # nothing of their file: not even its entries' names


def test_a_folder_swapped_after_its_check_is_not_listed(portal, monkeypatch):
    """The same race on a folder page: the listing shows nothing of the other proposal."""
    from calypso.flows.portal import browse
    from calypso.registry.access import landlock

    if not landlock.abi_version():
        pytest.skip("this kernel has no Landlock: the portal's listings are checked only")
    f = portal.facility
    alice = signed_in_with_ldap(portal, "alice")
    theirs = f.b_raw.parent / "theirs-only"
    theirs.mkdir(exist_ok=True)
    (theirs / "their-secret-name.h5").write_bytes(b"")
    mine = f.a_raw.parents[1] / "listed-later"
    mine.mkdir(exist_ok=True)
    (mine / "my-file.h5").write_bytes(b"")
    url = f"/folder/{portal_path(portal, mine)}"
    assert "my-file.h5" in alice.get(url).text
    located = browse.locate

    def locate_then_swap(*args):
        path = located(*args)
        (mine / "my-file.h5").unlink()
        mine.rmdir()
        mine.symlink_to(theirs)
        return path

    monkeypatch.setattr(browse, "locate", locate_then_swap)
    answer = alice.get(url)
    assert answer.status_code in (200, 403), answer.text
    assert "their-secret-name" not in answer.text


def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(portal):
    alice = signed_in_with_ldap(portal, "alice")
    copy = httpx.Client(base_url=portal.url, cookies=dict(alice.cookies))
    assert copy.get("/").status_code == 200
    assert alice.post("/signout", data={"csrf": csrf(alice)}).status_code == 303
    assert copy.get("/").status_code == 303  # to the sign-in page
    assert copy.get("/h5grove/meta?file=ih0001/x.h5").status_code == 401
    again = signed_in_with_ldap(portal, "alice")  # a new session works
    assert again.get("/").status_code == 200


# -- runs: launch, follow, rerun, export; and Bob -----------------------------------------


def test_launch_follow_rerun_export(portal, alice_run):
    from calypso.flows.portal.audit import actions
    from calypso.registry import SQLiteCatalogue

    alice, settings = alice_run.client, portal.settings
    first = alice.get(f"/launches/{alice_run.launch_id}", follow_redirects=True)
    assert first.status_code == 200 and "Completed" in first.text, first.text[:2000]
    run_id = str(first.url).rsplit("/", 1)[-1]
    assert f"/runs/{run_id})" in first.text  # its artifact in Prefect links back here
    assert run_id in alice.get("/runs").text  # tagged with her proposal, found on the server
    # Rerun with another parameter: the form comes filled with the run's values.
    form = alice.get(f"/launch/diffraction?input={quote(alice_run.raw)}&rerun={run_id}").text
    assert 'name="npt" value="100"' in form
    f = portal.facility
    values = {"poni": str(f.poni), "mask": str(f.mask), "npt": "80"}
    rerun = follow(alice, launch(alice, alice_run.raw, values, rerun=run_id))
    records = {r.flow_run_id: r for r in SQLiteCatalogue(settings.catalogue_path).list()}
    assert records[run_id].parameters["npt"] == 100
    second = next(r for r in records.values() if r.processed_path == rerun["processed_dataset_dir"])
    assert (
        second.parameters["npt"] == 80 and second.processed_path != alice_run.processed_dataset_dir
    )
    # Export the first run's results to the S3 server.
    folder = portal_path(portal, Path(alice_run.processed_dataset_dir))
    answer = alice.post("/export", data={"csrf": csrf(alice), "folder": folder, "run": run_id})
    assert answer.status_code == 303
    export_id = answer.headers["location"].rsplit("/", 1)[-1]
    state = wait_until(
        lambda: (s := alice.get(f"/api/exports/{export_id}").json())["state"] != "exporting" and s,
        60,
        "the export",
    )
    assert state["state"] == "completed", state
    assert state["progress"][0] == state["progress"][1] > 0  # bytes sent, all of them
    keys = [o["Key"] for o in portal.s3.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.endswith(".h5") for k in keys), keys
    done = {(a["action"], a["outcome"]) for a in actions(settings, "alice")}
    assert {("launch", "completed"), ("rerun", "completed"), ("export", "completed")} <= done

    # Bob: her dataset page, its file contents, her run and its export: not found.
    bob = signed_in_with_oidc(portal, "bob")
    dataset = f"/dataset/ih0001/id00/{f.session}/{f.a_raw.parent.name}/{f.a_raw.name}"
    output = portal_path(portal, Path(alice_run.outputs[0].split("::")[0]))
    for path in [
        dataset,
        f"/view/{output}",
        f"/h5grove/data?file={quote(output)}&path=/",
        f"/files/{output}",
        f"/runs/{run_id}",
        f"/launch/diffraction?input={quote(alice_run.raw)}&rerun={run_id}",
        f"/launches/{alice_run.launch_id}",
        f"/exports/{export_id}",
    ]:
        assert bob.get(path).status_code == 404, path
    assert alice.get(dataset).status_code == 200
    refused = bob.post("/export", data={"csrf": csrf(bob), "folder": folder})
    assert refused.status_code == 404
    assert run_id not in bob.get("/runs").text


def test_a_saved_flow_of_their_proposal_runs_from_the_portal(portal, alice_run):
    import yaml

    from calypso.flows.specification import export_specification
    from calypso.registry.access import Identity
    from calypso.registry.saved_flows import SavedFlows

    f, alice = portal.facility, alice_run.client
    flows = SavedFlows(portal.settings.catalogue_path)
    spec = yaml.safe_load(export_specification("diffraction"))
    spec["steps"]["plan"]["parameters"].update(poni=str(f.poni), mask=str(f.mask), npt=60)
    owner = Identity("alice", "ldap", proposals={"ih0001"})
    flows.save("rings", yaml.safe_dump(spec), "diffraction", owner, "ih0001", "")
    bob = Identity("bob", "ldap", proposals={"ih0002"})
    flows.save("bobs", export_specification("diffraction"), "diffraction", bob, "ih0002", "")
    page = alice.get(f"/dataset/ih0001/id00/{f.session}/CeO2/CeO2_0001").text
    assert 'value="rings@1"' in page and "bobs" not in page
    refused = alice.post(
        "/launch-flow", data={"csrf": csrf(alice), "flow": "bobs", "input": alice_run.raw}
    )
    assert refused.status_code == 404
    answer = alice.post(
        "/launch-flow", data={"csrf": csrf(alice), "flow": "rings@1", "input": alice_run.raw}
    )
    assert answer.status_code == 303, answer.text
    state = follow(alice, answer.headers["location"].rsplit("/", 1)[-1])
    assert state["run"] and alice.get(f"/runs/{state['run']}").status_code == 200


# -- the plot, in a browser ----------------------------------------------------------------


def test_a_processed_file_plots_in_the_browser(
    portal, alice_run, chromium, test_artifacts, tmp_path
):
    from PIL import Image

    from calypso.flows.portal.app import viewer_built
    from tests.portal_browser import Browser, first_plot_s, loading

    output = portal_path(portal, Path(alice_run.outputs[0].split("::")[0]))
    if not viewer_built():  # the page says how to build it
        assert "make install" in alice_run.client.get(f"/view/{output}").text
        pytest.skip("the h5web viewer is not built (make install needs node and npm)")
    source = Path(alice_run.outputs[0].split("::")[0])
    large = source.with_name("CeO2_0001_600.h5")  # beside it: its links to the raw data hold
    tile_frames(source, large, 600)
    browser = Browser(shutil.which("chromium"), tmp_path / "chromium")
    try:
        browser.call("Network.enable")
        browser.set_cookie(portal.url, "calypso_portal", alice_run.client.cookies["calypso_portal"])
        first_plot = first_plot_s(browser, f"{portal.url}/view/{output}")
        timeline = loading(browser)
        Image.fromarray(browser.screenshot()).save(test_artifacts / "portal-plot.png")
        large_plot = first_plot_s(browser, f"{portal.url}/view/{portal_path(portal, large)}")
        large_timeline = loading(browser)
        Image.fromarray(browser.screenshot()).save(test_artifacts / "portal-plot-600.png")
        f = portal.facility  # and the dataset's page, raw and processed side by side
        browser.open(f"{portal.url}/dataset/ih0001/id00/{f.session}/CeO2/CeO2_0001")
        wait_until(lambda: browser.evaluate("document.readyState") == "complete", 10, "the page")
        Image.fromarray(browser.screenshot()).save(test_artifacts / "portal-dataset.png")
        browser.open(f"{portal.url}/runs/{alice_run.run}")
        wait_until(lambda: browser.evaluate("document.readyState") == "complete", 10, "the page")
        Image.fromarray(browser.screenshot()).save(test_artifacts / "portal-run.png")
    finally:
        browser.close()
    assert first_plot is not None, "no plot on screen within 30 s (test-artifacts/portal-plot.png)"
    assert large_plot is not None, "the 600-frame result did not plot within 30 s"
    print(
        f"\nfirst plot {first_plot:.2f} s after the page was asked for (4 frames: {timeline}); "
        f"{large_plot:.2f} s for a 600-frame integrated result ({large_timeline})"
    )


def tile_frames(source: Path, target: Path, frames: int) -> None:
    """``source``'s NeXus result with its integrated patterns repeated to ``frames`` frames:
    the layout of a longer scan's result, made from a real run's patterns."""
    import h5py
    import numpy as np

    shutil.copy(source, target)
    with h5py.File(target, "a") as h5:
        entry = h5[h5.attrs["default"]]
        group = entry[entry.attrs["default"]]
        count = group[group.attrs["signal"]].shape[0]
        for name, item in list(group.items()):
            if isinstance(item, h5py.Dataset) and item.ndim and item.shape[0] == count:
                attributes, values = dict(item.attrs), item[()]
                del group[name]
                if name == "points":
                    repeated = np.arange(frames, dtype=values.dtype)
                else:
                    repeated = np.resize(values, (frames, *values.shape[1:]))
                group.create_dataset(name, data=repeated).attrs.update(attributes)
