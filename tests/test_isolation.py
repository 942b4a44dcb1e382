"""Only the right people (issue #20): who asks is verified (the Unix account, a sign-in
through a real OpenLDAP directory or a real OpenID Connect provider, both on loopback),
and every entry point refuses what lies outside their proposals, with one line, exit
code 7, and nothing written; the same actions on their own data work.

The matrix: for ``calypso run``, ``calypso flows save/run``, runs that a deployment starts
(events, the Prefect UI) and ``calypso export``: proposal B's dataset, ``..``, a symlink out,
a virtual dataset (and an external link) into another proposal, a foreign proposal id.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.cli import main
from calypso.registry.access import (
    AccessError,
    Identity,
    Intent,
    SignInError,
    acting_as,
    confine,
)
from calypso.settings import load_settings

pytestmark = pytest.mark.slow
SUFFIX = "dc=calypso,dc=test"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}

# -- a real directory: Debian's OpenLDAP on loopback ---------------------------------------

_SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {work}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
rootpw admin-secret
directory {work}/db
access to attrs=userPassword
  by self write
  by anonymous auth
  by * none
access to *
  by users read
  by * none
"""


def _person(uid: str, number: int) -> str:
    return (
        f"dn: uid={uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
        f"objectClass: posixAccount\nuid: {uid}\ncn: {uid.title()}\nsn: {uid.title()}\n"
        f"uidNumber: {number}\ngidNumber: {number}\nhomeDirectory: /home/{uid}\n"
        f"userPassword: {PASSWORDS[uid]}\n"
    )


# alice: posixGroup ih0001 (memberUid); bob: groupOfNames ih0002 (member); carol: staff.
_DIRECTORY = "\n".join(
    [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Calypso\n"
        "dc: calypso\n",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n",
        _person("alice", 20001),
        _person("bob", 20002),
        _person("carol", 20003),
        f"dn: cn=ih0001,ou=groups,{SUFFIX}\nobjectClass: posixGroup\ncn: ih0001\n"
        "gidNumber: 30001\nmemberUid: alice\n",
        f"dn: cn=ih0002,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: ih0002\n"
        f"member: uid=bob,ou=people,{SUFFIX}\n",
        f"dn: cn=users,ou=groups,{SUFFIX}\nobjectClass: posixGroup\ncn: users\n"
        "gidNumber: 30000\nmemberUid: alice\nmemberUid: bob\n",
        f"dn: cn=calypso-staff,ou=groups,{SUFFIX}\nobjectClass: posixGroup\n"
        "cn: calypso-staff\ngidNumber: 30009\nmemberUid: carol\n",
    ]
)


def _slapd() -> Path:
    """Debian's slapd; installed with apt-get when missing and allowed (.ci/run does it)."""
    binary = Path("/usr/sbin/slapd")
    if not binary.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "slapd"],
            capture_output=True,
            timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    if not binary.exists():
        pytest.skip("Debian's slapd is not installed and cannot be: apt-get install slapd")
    return binary


@pytest.fixture(scope="module")
def directory(tmp_path_factory, loopback):
    """slapd on a free loopback port, as this user, loaded with users and proposal groups."""
    slapd = _slapd()
    work = tmp_path_factory.mktemp("slapd")
    (work / "db").mkdir()
    config = work / "slapd.conf"
    config.write_text(_SLAPD_CONF.format(work=work, suffix=SUFFIX))
    (work / "directory.ldif").write_text(_DIRECTORY)
    loaded = subprocess.run(
        ["/usr/sbin/slapadd", "-f", str(config), "-l", str(work / "directory.ldif")],
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    port = loopback.free_port()
    url = f"ldap://127.0.0.1:{port}"
    log = open(work / "slapd.log", "wb")  # noqa: SIM115 (kept open while it runs)
    server = subprocess.Popen(
        [str(slapd), "-f", str(config), "-h", f"{url}/", "-d", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, (work / "slapd.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "slapd did not listen"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=20)
    log.close()


# -- a real OpenID Connect provider on loopback ----------------------------------------------


@pytest.fixture(scope="module")
def issuer():
    """oidc-provider-mock on a free port; alice's groups in its 'groups' claim, as
    Keycloak writes them."""
    import httpx
    from oidc_provider_mock import run_server_in_thread

    with run_server_in_thread(port=0) as server:
        url = f"http://localhost:{server.server_port}"
        for name, groups in (("alice", ["/ih0001", "/users"]), ("bob", ["/ih0002"])):
            claims = {"preferred_username": name, "groups": groups, "email": f"{name}@x.org"}
            httpx.put(f"{url}/users/{name}", json=claims).raise_for_status()
        yield url


def _access_env(monkeypatch, directory: str, issuer: str, roots: list[Path]) -> None:
    for name, value in {
        "CALYPSO_DATA_ROOTS": json.dumps([str(r) for r in roots]),
        "CALYPSO_ACCESS__PROPOSAL_GROUPS": '["{proposal}"]',
        "CALYPSO_ACCESS__STAFF_GROUPS": '["calypso-staff"]',
        "CALYPSO_ACCESS__LDAP__URL": directory,
        "CALYPSO_ACCESS__LDAP__USER_DN": f"uid={{username}},ou=people,{SUFFIX}",
        "CALYPSO_ACCESS__LDAP__GROUP_BASE": f"ou=groups,{SUFFIX}",
        "CALYPSO_ACCESS__OIDC__ISSUER": issuer,
        "CALYPSO_ACCESS__OIDC__CLIENT_ID": "calypso-portal",
        "CALYPSO_ACCESS__OIDC__CLIENT_SECRET": "portal-secret",
        "CALYPSO_EXECUTOR__N_WORKERS": "1",
    }.items():
        monkeypatch.setenv(name, value)


def ldap_user(name: str) -> Identity:
    from calypso.registry.access.ldap import ldap_sign_in

    return ldap_sign_in(name, PASSWORDS[name], load_settings())


def oidc_user(name: str, redirect: str = "http://127.0.0.1:9/callback") -> Identity:
    """The authorization-code flow as a browser goes through it: to the provider's page,
    the user signs in, back to Calypso with a code."""
    import httpx

    from calypso.registry.access.oidc import OidcSignIn

    sign_in = OidcSignIn(load_settings())
    pending = sign_in.begin(redirect)
    answer = httpx.post(pending.url, data={"sub": name})
    assert answer.status_code == 302, answer.text
    return sign_in.complete(pending, answer.headers["location"])


# -- data: two proposals, and datasets in A's that lead into B's ------------------------------


class Facility:
    def __init__(self, base: Path) -> None:
        from calypso.flows.samples.diffraction import write_diffraction_sample

        self.visitor = base / "visitor"
        self.visitor.mkdir()
        for proposal, seed in (("ih0001", 1), ("ih0002", 2)):
            stage = base / f"stage-{proposal}"
            sample = write_diffraction_sample(stage, frames=4, frames_per_file=2, seed=seed)
            (stage / "ih0001").rename(self.visitor / proposal)
        relative = sample.raw_dataset_dir.relative_to(stage / "ih0001")
        self.session = relative.parts[1]
        self.a_raw = self.visitor / "ih0001" / relative
        self.b_raw = self.visitor / "ih0002" / relative
        calibration = self.a_raw.parents[2] / "SCRIPTS" / "calibration"
        self.poni, self.mask = (
            calibration / "pilatus1m_CeO2.poni",
            calibration / "pilatus1m_mask.edf",
        )
        collection = self.a_raw.parent
        # a symlink in A's RAW_DATA to B's dataset
        self.symlink = collection / "CeO2_0098"
        self.symlink.symlink_to(self.b_raw)
        # A's dataset whose detector data is a virtual dataset of B's frames
        self.vds = self._copy(collection / "CeO2_0099")
        with h5py.File(self.vds / "CeO2_0099.h5", "a") as h5:
            self._point_vds_at(h5, self.b_raw)
        # A's dataset whose detector data names B's images (a CBF or TIFF saving's
        # FILE::INDEX strings), relative to A's dataset file as Bliss's writer names them
        self.named = self._copy(collection / "CeO2_0096")
        theirs = self.b_raw.parents[2] / "SCRIPTS" / "calibration" / "pilatus1m_mask.edf"
        with h5py.File(self.named / "CeO2_0096.h5", "a") as h5:
            del h5["1.1/instrument/pilatus1m/data"]
            name = os.path.relpath(theirs, self.named)
            h5["1.1/instrument/pilatus1m/data"] = np.array([f"{name}::0"] * 4, dtype=object)
        # A's dataset with an external link into B's dataset file
        self.linked = self._copy(collection / "CeO2_0097")
        with h5py.File(self.linked / "CeO2_0097.h5", "a") as h5:
            h5["1.1/measurement/theirs"] = h5py.ExternalLink(
                str(self.b_raw / "CeO2_0001.h5"), "/1.1"
            )
        self.dotdot = (
            f"{self.a_raw.parents[2]}/../../../ih0002/id00/{self.session}/RAW_DATA/CeO2/CeO2_0001"
        )

    def _copy(self, folder: Path) -> Path:
        shutil.copytree(self.a_raw, folder)
        (folder / "CeO2_0001.h5").rename(folder / f"{folder.name}.h5")
        return folder

    def _point_vds_at(self, h5: h5py.File, other: Path) -> None:
        found: list[str] = []
        h5.visititems(lambda n, o: found.append(n) if getattr(o, "is_virtual", False) else None)
        for name in found:
            old = h5[name]
            layout = h5py.VirtualLayout(shape=old.shape, dtype=old.dtype)
            start = 0
            for source in old.virtual_sources():
                theirs = other / source.file_name
                with h5py.File(theirs, "r") as frames:
                    shape = frames[source.dset_name].shape
                layout[start : start + shape[0]] = h5py.VirtualSource(
                    str(theirs), source.dset_name, shape=shape
                )
                start += shape[0]
            attributes = dict(old.attrs)
            del h5[name]
            h5.create_virtual_dataset(name, layout, fillvalue=0).attrs.update(attributes)

    def state(self) -> list:
        """Everything under the data root, to show that a refusal wrote nothing."""
        return sorted(
            (str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in self.visitor.rglob("*")
        )


@pytest.fixture(scope="module")
def facility(tmp_path_factory):
    return Facility(tmp_path_factory.mktemp("isolation"))


@pytest.fixture
def signed_in(monkeypatch, directory, issuer, facility, catalogue_path):
    _access_env(monkeypatch, directory, issuer, [facility.visitor])
    return facility


def _refused(capsys, argv: list[str], message: str, facility: Facility, identity=None) -> None:
    before = facility.state()
    if identity is None:
        code = main(argv)
    else:
        with acting_as(identity):
            code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 7, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("calypso: error: refused: "), err
    assert message in lines[0], (message, lines[0])
    assert facility.state() == before, f"{argv} wrote something"


# -- sign-in ------------------------------------------------------------------------------


def test_sign_in_through_ldap_and_openid_connect(signed_in, capsys, monkeypatch):
    from calypso.registry.access.ldap import ldap_sign_in

    alice = ldap_user("alice")
    assert (alice.name, alice.source, alice.proposals) == ("alice", "ldap", {"ih0001"})
    assert {"ih0001", "users"} <= alice.groups and not alice.staff
    bob = ldap_user("bob")  # a groupOfNames member
    assert bob.proposals == {"ih0002"}
    carol = ldap_user("carol")  # staff: every proposal
    assert carol.staff and carol.member_of("ih0002")
    settings = load_settings()
    for name, password, message in [
        ("alice", "wrong", "wrong user name or password"),
        ("nobody", "x", "wrong user name or password"),
        ("alice", "", "no password"),  # an anonymous bind would succeed
        ("*)(uid=*", "x", "is not a user name"),
    ]:
        with pytest.raises(SignInError, match=message):
            ldap_sign_in(name, password, settings)
    # `calypso whoami --ldap`
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("alice-secret\n"))
    assert main(["whoami", "--ldap", "alice", "--password-stdin", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified_by"] == "ldap" and shown["proposals"] == ["ih0001"]

    # OpenID Connect: the ID token verified with the issuer's keys, groups from a claim.
    oidc = oidc_user("alice")
    assert (oidc.name, oidc.source, oidc.proposals) == ("alice", "oidc", {"ih0001"})
    assert oidc_user("bob").proposals == {"ih0002"}
    from calypso.registry.access.oidc import OidcSignIn

    sign_in = OidcSignIn(settings)
    pending = sign_in.begin("http://127.0.0.1:9/callback")
    import httpx

    answer = httpx.post(pending.url, data={"sub": "alice"}).headers["location"]
    with pytest.raises(SignInError, match="not for this sign-in"):
        sign_in.complete(pending, answer.replace("state=", "state=x"))
    token = _id_token(sign_in, pending, answer)
    forged = token[:-8] + ("AAAAAAAA" if not token.endswith("AAAAAAAA") else "BBBBBBBB")
    with pytest.raises(SignInError, match="does not verify"):
        sign_in.verify(forged, pending.nonce)
    with pytest.raises(SignInError, match="does not verify"):
        sign_in.verify(token, "another nonce")
    assert sign_in.verify(token, pending.nonce)["sub"] == "alice"
    denied = httpx.post(pending.url, data={"sub": "alice", "action": "deny"})
    with pytest.raises(SignInError, match="access_denied"):
        sign_in.complete(pending, denied.headers["location"])


def _id_token(sign_in, pending, callback: str) -> str:
    from urllib.parse import parse_qs, urlsplit

    code = parse_qs(urlsplit(callback).query)["code"][0]
    with sign_in._client(pending.redirect_uri) as client:
        token = client.fetch_token(
            sign_in.metadata["token_endpoint"], code=code, code_verifier=pending.code_verifier
        )
    return token["id_token"]


def test_whoami_signs_in_through_a_browser_with_openid_connect(signed_in):
    """``calypso whoami --oidc``: a loopback redirect, as command-line tools do."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "calypso.flows.cli", "whoami", "--oidc", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().startswith("open this address")
        url = process.stdout.readline().strip()
        back = httpx.post(url, data={"sub": "bob"}).headers["location"]
        assert back.startswith("http://127.0.0.1:")
        httpx.get(back).raise_for_status()  # the browser comes back to the loopback port
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.startswith("bob (verified by oidc)") and "proposals: ih0002" in out


# -- the isolation matrix -------------------------------------------------------------------


def test_calypso_run_refuses_what_is_not_theirs_and_runs_their_own(signed_in, capsys):
    f = signed_in
    alice = ldap_user("alice")
    own = ["--set", f"poni={f.poni}", "--set", f"mask={f.mask}", "--set", "npt=100"]
    cases = [
        ([str(f.b_raw)], "belongs to proposal ih0002, and alice is not a member of it"),
        ([f.dotdot], "'..' is not allowed in paths"),
        ([str(f.symlink)], "input " + str(f.symlink) + " leads outside proposal ih0001"),
        ([str(f.vds)], "a virtual dataset at " + str(f.vds / "CeO2_0099.h5")),
        ([str(f.named)], "a frame reference at " + str(f.named / "CeO2_0096.h5")),
        ([str(f.linked)], "an external link at " + str(f.linked / "CeO2_0097.h5")),
        # a foreign proposal id: B's calibration as a parameter, B's folder as output
        (["--set", f"poni={f.b_raw.parents[2]}/SCRIPTS/calibration/pilatus1m_CeO2.poni"],
         "leads outside proposal ih0001: a file every proposal's runs read (a calibration, a "
         "mask) belongs in a folder named in the settings' access.shared_paths"),
        (["--output", str(f.b_raw.parents[2] / "PROCESSED_DATA" / "mine")],
         "leads outside proposal ih0001"),
        ([str(f.visitor.parent / "stage-ih0001")], "outside the configured data roots"),
    ]  # fmt: skip
    for arguments, message in cases:
        raw = [] if arguments[0].startswith("--") else arguments[:1]
        rest = arguments[len(raw) :]
        argv = ["run", "diffraction", *(raw or [str(f.a_raw)]), *own, *rest]
        _refused(capsys, argv, message, f, alice)
    with acting_as(alice):
        assert main(["run", "diffraction", str(f.a_raw), *own, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["processed_dataset_dir"].startswith(str(f.visitor / "ih0001"))


def test_saved_flows_refuse_what_is_not_theirs_and_run_their_own(signed_in, capsys, tmp_path):
    import yaml

    f = signed_in
    alice, bob = ldap_user("alice"), ldap_user("bob")
    assert main(["flows", "export", "diffraction"]) == 0
    spec = yaml.safe_load(capsys.readouterr().out)
    spec["steps"]["plan"]["parameters"].update(poni=str(f.poni), mask=str(f.mask), npt=80)
    path = tmp_path / "rings.yaml"
    path.write_text(yaml.safe_dump(spec))
    # Saving for a proposal needs membership; the owner is who signed in.
    save = ["flows", "save", str(path), "--name", "rings"]
    _refused(capsys, [*save, "--proposal", "ih0002"], "alice is not a member of proposal", f, alice)
    with acting_as(alice):
        assert main([*save, "--proposal", "ih0001"]) == 0
    assert "owner alice, proposal ih0001" in capsys.readouterr().out
    with acting_as(bob):  # bob's flow, for his proposal
        assert main(["flows", "save", str(path), "--name", "bobs", "--proposal", "ih0002"]) == 0
    capsys.readouterr()
    _refused(capsys, [*save, "--proposal", "ih0002"], "flow 'rings' belongs to alice", f, bob)
    with acting_as(bob):  # with data roots, a flow is saved for one of one's proposals
        assert main([*save]) == 2
    assert "give the flow's proposal (--proposal ID, one of yours: ih0002)" in (
        capsys.readouterr().err
    )
    _refused(capsys, ["flows", "delete", "rings"], "belongs to alice", f, bob)
    run = ["flows", "run", "rings"]
    cases = [
        ([*run, str(f.b_raw)], "belongs to proposal ih0002"),
        ([*run, f.dotdot], "'..' is not allowed"),
        ([*run, str(f.symlink)], "leads outside proposal ih0001"),
        ([*run, str(f.vds)], "a virtual dataset at"),
        ([*run, str(f.linked)], "an external link at"),
        (["flows", "run", "bobs", str(f.a_raw)], "the flow bobs@1 to proposal ih0002"),
        (["flows", "run", "bobs", str(f.b_raw)], "alice is not a member of it"),
    ]
    for argv, message in cases:
        _refused(capsys, argv, message, f, alice)
    with acting_as(alice):
        assert main([*run, str(f.a_raw), "--json"]) == 0
    [variant] = json.loads(capsys.readouterr().out)["variants"]
    assert variant["processed_dataset_dir"].endswith("diffraction_rings_v1")


def test_runs_a_deployment_starts_are_confined_by_the_service(signed_in, monkeypatch, capsys):
    """Events and the Prefect UI start runs through deployments: nobody signed in, so the
    service confines each run to one proposal under the data roots."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from calypso.flows.techniques import TECHNIQUES
    from calypso.techniques.diffraction import DiffractionParameters

    f = signed_in
    monkeypatch.setattr("calypso.registry.access.served_run", lambda: True)
    flow = TECHNIQUES["diffraction"].flow().with_options(task_runner=ThreadPoolTaskRunner(2))
    parameters = DiffractionParameters(poni=str(f.poni), mask=str(f.mask), npt=60)
    outside = f.visitor.parent / "stage-ih0001"
    cases = [
        (str(outside), parameters, "outside the configured data roots"),
        (f.dotdot, parameters, "'..' is not allowed"),
        (str(f.symlink), parameters, "leads outside proposal ih0001"),
        (str(f.vds), parameters, "a virtual dataset at"),
        (str(f.a_raw), parameters.model_copy(update={"poni": "/etc/passwd"}), "parameters.poni"),
    ]
    for raw, given, message in cases:
        before = f.state()
        with pytest.raises(AccessError, match=message):
            flow(raw=raw, parameters=given, trigger="an-event")
        assert f.state() == before
    # a saved flow of proposal ih0002, started on ih0001's data
    from calypso.flows.specification import export_specification
    from calypso.flows.user_flows import saved_flow
    from calypso.registry.saved_flows import SavedFlows

    bob = Identity("bob", "ldap", proposals={"ih0002"})
    SavedFlows(load_settings().catalogue_path).save(
        "bobs", export_specification("diffraction"), "diffraction", bob, "ih0002", ""
    )
    with pytest.raises(AccessError, match="the flow bobs@1 to proposal ih0002"):
        saved_flow(name="bobs", raw=str(f.a_raw))
    summary = flow(raw=str(f.a_raw), parameters=parameters, trigger="an-event")
    assert summary["processed_dataset_dir"].startswith(str(f.visitor / "ih0001"))


def test_export_refuses_what_is_not_theirs_and_exports_their_own(
    signed_in, capsys, tmp_path, monkeypatch
):
    from calypso.registry import SQLiteCatalogue
    from calypso.registry.catalogue import ProcessedDataset

    f = signed_in
    # The facility's export area: each proposal's place in it, <area>/<proposal>/..., is a
    # target (else a folder inside the proposal).
    monkeypatch.setenv("CALYPSO_EXPORT__DEFAULT_TARGET", str(tmp_path / "exports"))
    settings = load_settings()
    catalogue = SQLiteCatalogue(settings.catalogue_path)
    folders = {}
    for proposal in ("ih0001", "ih0002"):
        folder = f.visitor / proposal / "id00" / f.session / "PROCESSED_DATA" / "exported"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.h5").write_bytes(b"results of " + proposal.encode())
        record = ProcessedDataset(
            technique="diffraction", raw_dataset=str(f.a_raw), processed_path=str(folder)
        )
        folders[proposal] = (folder, catalogue.register(record))
    mine, theirs = folders["ih0001"], folders["ih0002"]
    sneaky = mine[0].parent / "sneaky"
    sneaky.mkdir(exist_ok=True)
    (sneaky / "theirs.h5").symlink_to(theirs[0] / "result.h5")
    alice = oidc_user("alice")  # the portal's users sign in through OpenID Connect
    target = str(tmp_path / "exports" / "ih0001" / "alice")
    cases = [
        (str(theirs[1]), "belongs to proposal ih0002"),  # a foreign catalogue id
        (str(theirs[0]), "belongs to proposal ih0002"),
        (f"{mine[0]}/../../../../../ih0002/id00/{f.session}/PROCESSED_DATA/exported", "'..'"),
        (str(sneaky), "the symlink"),
    ]
    for source, message in cases:
        _refused(capsys, ["export", source, "--to", target], message, f, alice)
        assert not (tmp_path / "exports").exists()
    into_theirs = str(theirs[0].parent / "copy")
    _refused(capsys, ["export", str(mine[1]), "--to", into_theirs], "export target", f, alice)
    # Another proposal's place in the export area, and object stores beside the configured
    # area, would be written with the service's credentials.
    for elsewhere, message in [
        (str(tmp_path / "exports" / "ih0002" / "alice"), "not this proposal's place"),
        ("s3://facility/ih0002/run", "no object store is configured for exports"),
    ]:
        _refused(capsys, ["export", str(mine[1]), "--to", elsewhere], message, f, alice)
    monkeypatch.setenv("CALYPSO_EXPORT__DEFAULT_TARGET", "s3://facility/exports")
    for elsewhere in ("s3://facility/exports/ih0002/run", "s3://other/ih0001/run"):
        _refused(
            capsys,
            ["export", str(mine[1]), "--to", elsewhere],
            "place in the export store",
            f,
            alice,
        )
    # A run's --export-to is a prefix: its results go to <prefix>/<proposal>/... (the store
    # itself is one), or under the proposal's own place.
    run = ["run", "diffraction", str(f.a_raw), "--set", f"poni={f.poni}"]
    theirs_prefix = ["--export-to", "s3://facility/exports/ih0002"]
    _refused(capsys, [*run, *theirs_prefix], "place in the export store", f, alice)
    for allowed in ("s3://facility/exports", "s3://facility/exports/ih0001/mine"):
        intent = Intent("diffraction run", raw=str(f.a_raw), export_to=allowed)
        assert confine(alice, intent, load_settings()).proposal == "ih0001"
    monkeypatch.setenv("CALYPSO_EXPORT__DEFAULT_TARGET", str(tmp_path / "exports"))
    with acting_as(alice):
        assert main(["export", str(mine[1]), "--to", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 1
    assert (
        tmp_path / "exports" / "ih0001" / "alice" / "result.h5"
    ).read_bytes() == b"results of ih0001"


def test_files_named_inside_parameters_and_hard_links_are_checked(signed_in, capsys):
    """What a parameter names inside itself (a dataset of ``FILE::/path``, a spline or a
    detector file in a PONI file) and files with a second name (a hard link) are checked
    too: each let a run read another proposal's frames (an adversarial sweep)."""
    f = signed_in
    alice = ldap_user("alice")
    theirs = f.b_raw / "CeO2_0001.h5"
    crafted = f.a_raw.parents[1] / "crafted"  # in alice's RAW_DATA, beside her datasets
    crafted.mkdir()
    try:
        (crafted / "theirs.h5").symlink_to(theirs)
        with h5py.File(crafted / "dark.h5", "w") as h5:
            h5["d"] = h5py.ExternalLink(str(theirs), "/1.1/measurement/pilatus1m")
        calibration = f.poni.read_text().replace("SplineFile: None", "")
        (crafted / "spline.poni").write_text(calibration + f"SplineFile: {theirs}\n")
        detector = json.dumps({"filename": str(theirs)})
        (crafted / "nexus.poni").write_text(
            calibration + f"Detector: NexusDetector\nDetector_config: {detector}\n"
        )
        (crafted / "CeO2_0100").mkdir()
        os.link(theirs, crafted / "CeO2_0100" / "CeO2_0100.h5")
        own = ["--set", f"poni={f.poni}", "--set", f"mask={f.mask}"]
        frames = "::/1.1/measurement/pilatus1m"
        cases = [
            (["--set", f"dark={crafted / 'theirs.h5'}{frames}"], "leads outside proposal ih0001"),
            (["--set", f"dark={crafted / 'dark.h5'}::/d"], "an external link at"),
            (["--set", f"poni={crafted / 'spline.poni'}"], "(SplineFile in spline.poni)"),
            (["--set", f"poni={crafted / 'nexus.poni'}"], "(filename in nexus.poni)"),
            ([str(crafted / "CeO2_0100"), *own], "has 2 hard links"),
        ]
        for arguments, message in cases:
            raw = [] if arguments[0].startswith("--") else arguments[:1]
            rest = arguments[len(raw) :]
            argv = [
                "run",
                "diffraction",
                *(raw or [str(f.a_raw)]),
                *(own if not raw else []),
                *rest,
            ]
            _refused(capsys, argv, message, f, alice)
        processed = f.a_raw.parents[2] / "PROCESSED_DATA" / "linked"
        processed.mkdir(parents=True)
        os.link(theirs, processed / "result.h5")
        export = ["export", str(processed), "--to", str(processed.parent / "copy")]
        _refused(capsys, export, "hard links: Calypso cannot tell whose file it is", f, alice)
    finally:
        shutil.rmtree(crafted)
        shutil.rmtree(f.a_raw.parents[2] / "PROCESSED_DATA" / "linked", ignore_errors=True)


@pytest.mark.parametrize("when", ["before its part folder", "before publishing"])
def test_an_output_folder_swapped_during_the_run_is_not_written(
    signed_in, capsys, monkeypatch, when
):
    """Checked as the run begins, the output folder is swapped for a symlink into another
    proposal by a member of this one (a sweep wrote results into the other proposal so):
    the run writes nothing there and is recorded failed."""
    import calypso.flows.api as api
    from calypso.flows.flow_run import FlowRun

    f = signed_in
    alice = ldap_user("alice")
    output = f.a_raw.parents[2] / "PROCESSED_DATA" / f"swapped-{when.split()[1]}"
    theirs = f.b_raw.parents[2] / "PROCESSED_DATA" / "victim"
    theirs.mkdir(parents=True, exist_ok=True)

    def swap() -> None:
        if output.is_dir() and not output.is_symlink():
            for part in output.iterdir():  # the run's part folder moves along
                shutil.move(part, theirs / part.name)
            output.rmdir()
        output.parent.mkdir(parents=True, exist_ok=True)
        output.symlink_to(theirs)

    if when == "before its part folder":
        checked = api.confine_run
        monkeypatch.setattr(api, "confine_run", lambda *a, **k: (checked(*a, **k), swap()))
    else:
        completed = FlowRun.completed
        monkeypatch.setattr(FlowRun, "completed", lambda run, o: (swap(), completed(run, o))[1])
    argv = ["run", "diffraction", str(f.a_raw), "--set", f"poni={f.poni}"]
    argv += ["--set", f"mask={f.mask}", "--set", "npt=100", "--output", str(output)]
    from calypso.registry.access import landlock

    try:
        with acting_as(alice):
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 7, err
        if when == "before its part folder" and landlock.abi_version():
            # the planning's probe of the folder, confined to the proposal, cannot open it
            assert "a file outside proposal ih0001 was not opened" in err, err
        else:
            assert "now leads outside proposal ih0001" in err, err
        # (the part folder moved along by the swap stays hidden: nothing published)
        assert not [p for p in theirs.rglob("*") if ".calypso-partial" not in str(p)]
    finally:
        output.unlink(missing_ok=True)
        shutil.rmtree(theirs, ignore_errors=True)


SWAPS = [
    (swapped, when)
    for swapped in ("frames", "mask")
    for when in ("after the check", "after the plan")
] + [("dataset file", "after the chunks"), ("frames", "after the chunks")]


@pytest.mark.parametrize(("swapped", "when"), SWAPS)
def test_a_file_swapped_after_the_check_is_not_read(signed_in, capsys, monkeypatch, swapped, when):
    """Checked as the run begins, a file the run reads (a Lima file of frames, the mask,
    the dataset file its result links to) is swapped for a symlink into another proposal
    by a member of this one (a sweep read the other proposal's frames into its result
    so): the kernel stops the read, in the planning, the chunks or the writer (its quick
    look showed the other proposal's frame), and the run fails with a refusal, nothing
    published, no part folder left behind."""
    import calypso.flows.api as api
    import calypso.flows.engine as engine
    from calypso.registry.access import landlock

    if not landlock.abi_version():
        pytest.skip("this kernel has no Landlock: reads are checked, not confined")
    f = signed_in
    alice = ldap_user("alice")
    tag = f"{swapped.split()[0]}-{when.split()[-1]}"
    raw = f._copy(f.a_raw.parent / f"CeO2_{90 + SWAPS.index((swapped, when)):04d}")
    mask = f.mask.with_name(f"mask-{tag}.edf")
    shutil.copy(f.mask, mask)
    output = f.a_raw.parents[2] / "PROCESSED_DATA" / f"swap-{tag}"
    lima = Path("scan0001") / "pilatus1m_0001.h5"
    mine, theirs = {
        "frames": (raw / lima, f.b_raw / lima),
        "mask": (mask, f.b_raw.parents[2] / "SCRIPTS" / "calibration" / "pilatus1m_mask.edf"),
        "dataset file": (raw / f"{raw.name}.h5", f.b_raw / f"{f.b_raw.name}.h5"),
    }[swapped]

    def swap() -> None:
        mine.unlink()
        mine.symlink_to(theirs)

    if when == "after the check":
        checked = api.confine_run
        monkeypatch.setattr(api, "confine_run", lambda *a, **k: (checked(*a, **k), swap())[0])
    elif when == "after the plan":
        planned = engine.remember_plan
        monkeypatch.setattr(engine, "remember_plan", lambda *a, **k: (planned(*a, **k), swap()))
    else:  # the chunks are done: the writer links the result to the raw groups
        from calypso.tasks.writers import nexus

        link = nexus.link_raw_groups
        monkeypatch.setattr(nexus, "link_raw_groups", lambda *a, **k: (swap(), link(*a, **k)))
    argv = ["run", "diffraction", str(raw), "--set", f"poni={f.poni}", "--set", f"mask={mask}"]
    argv += ["--set", "npt=100", "--output", str(output)]
    try:
        with acting_as(alice):
            assert main(argv) == 7
        err = capsys.readouterr().err
        assert "a file outside proposal ih0001 was not opened" in err, err
        assert not [p for p in output.rglob("*.h5") if ".calypso" not in str(p)]
        # Nor is its part folder kept for a retry (refused again): the visitor could not
        # remove it.
        assert not list(output.rglob(".calypso-partial-*"))
    finally:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)
        mask.unlink(missing_ok=True)


def test_data_roots_named_through_a_symlink(signed_in, monkeypatch, tmp_path):
    """A facility's data root is often a symlink (/data/visitor to a GPFS mount): a
    dataset named through it is its proposal's, every file of it inside."""
    f = signed_in
    link = tmp_path / "visitor-link"
    link.symlink_to(f.visitor)
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", json.dumps([str(link)]))
    raw = link / f.a_raw.relative_to(f.visitor)
    output = raw.parents[2] / "PROCESSED_DATA" / "via-link"
    intent = Intent("diffraction run", raw=str(raw), output=str(output))
    assert confine(ldap_user("alice"), intent, load_settings()).proposal == "ih0001"
    with pytest.raises(AccessError, match="belongs to proposal ih0001"):
        confine(ldap_user("bob"), intent, load_settings())


def test_the_unix_account_owns_its_proposal_folders(monkeypatch, capsys, tmp_path):
    """The embedded default: no group mapping; the proposal folders an account owns under
    the data roots are its proposals (the current user: uids cannot be switched here)."""
    visitor = tmp_path / "visitor"
    mine, theirs = visitor / "ih0001", visitor / "ih0002"
    for proposal in (mine, theirs):
        raw = proposal / "id00" / "20261127" / "RAW_DATA" / "CeO2" / "CeO2_0001"
        raw.mkdir(parents=True)
        (raw / "CeO2_0001.h5").write_bytes(b"")
    (mine / "results").mkdir()
    (mine / "results" / "r.dat").write_text("mine")
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another uid needs root (CI runs as root)")
    for path in [theirs, *theirs.rglob("*")]:
        os.lchown(path, 65534, 65534)
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", json.dumps([str(visitor)]))
    monkeypatch.setenv("CALYPSO_CATALOGUE__PATH", str(tmp_path / "catalogue.sqlite"))
    assert main(["whoami", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified_by"] == "unix" and shown["proposals"] == ["ih0001"]
    argv = ["run", "diffraction", str(theirs / "id00/20261127/RAW_DATA/CeO2/CeO2_0001")]
    before = sorted(visitor.rglob("*"))
    assert main(argv) == 7
    assert "belongs to proposal ih0002" in capsys.readouterr().err
    assert main(["export", str(theirs), "--to", str(tmp_path / "out")]) == 7
    capsys.readouterr()
    assert sorted(visitor.rglob("*")) == before
    assert main(["export", str(mine / "results"), "--to", str(mine / "copy")]) == 0
    assert (mine / "copy" / "r.dat").read_text() == "mine"
    # Services fail closed: no data roots, no serve, no watch.
    monkeypatch.delenv("CALYPSO_DATA_ROOTS")
    from calypso.flows.online.watch import Watcher

    with pytest.raises(Exception, match="calypso watch refuses to start without data roots"):
        Watcher([visitor], load_settings(), "http://127.0.0.1:9/api")
    from calypso.errors import ConfigurationError
    from calypso.flows.online.serve import serve

    with pytest.raises(ConfigurationError, match="calypso serve refuses to start without data"):
        serve(load_settings())
    # ... nor with a root that is not there (every run would be refused), nor a relative
    # one (another folder for each service): both were taken without a word.
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", json.dumps([str(tmp_path / "not-mounted")]))
    with pytest.raises(ConfigurationError, match="data root .*not-mounted is not a folder"):
        serve(load_settings())
    monkeypatch.setenv("CALYPSO_DATA_ROOTS", '["data/visitor"]')
    with pytest.raises(ConfigurationError, match="data root data/visitor is not an absolute"):
        load_settings()
