"""User flows: specifications checked all at once, saved in versions, run like built-ins,
swept in parallel, confined to their proposal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from calypso.flows.api import build_parameters, run_technique
from calypso.flows.cli import main
from calypso.flows.specification import SpecificationError, check_specification
from calypso.registry.access import Identity, acting_as
from calypso.settings import load_settings

pytestmark = pytest.mark.slow

# Signed-in users (tests/test_isolation.py signs them in through a real directory).
ALICE = Identity("alice", "ldap", proposals={"ih0001"})
MALLORY = Identity("mallory", "ldap", proposals={"ih0666"})
BOB = Identity("bob", "ldap", proposals={"ih0001"})


@pytest.fixture
def user(catalogue_path):
    """The Unix account of the tests, on one machine (no data roots): every proposal."""
    return "unix"


def test_a_specification_with_many_mistakes_reports_each_with_its_place():
    text = """\
calypso: 1
colour: blue
steps:
  plan:
    task: tomography.plan
    parameters:
      ring_removel: true
      delta_beta: "lots"
      center_of_rotation: {start: 5, stop: 1, step: 1}
  center:
    task: tomography.centre_of_rotation
    inputs: {plan: plan}
  slices:
    task: tomography.reconstruct
    inputs: {plan: plan, centre: center, extra: plan}
  write:
    task: tomography.write
    inputs: {plan: plan, center: write, slices: nowhere}
    parameters: {npt: 2}
  Bad-Name:
    task: diffraction.integrate
    inputs: {plan: plan}
"""
    with pytest.raises(SpecificationError) as raised:
        check_specification(text, "mine.yaml")
    problems = "\n".join(raised.value.problems)
    expected = [
        "line 2, colour: unknown field",
        "line 7, steps.plan.parameters.ring_removel: unknown tomography parameter "
        "(did you mean 'ring_removal'?)",
        "line 8, steps.plan.parameters.delta_beta: Input should be a valid number",
        "line 9, steps.plan.parameters.center_of_rotation: bad range",
        "line 11, steps.center.task: unknown task 'tomography.centre_of_rotation' "
        "(did you mean 'tomography.center_of_rotation'?)",
        "steps.slices.inputs: missing input 'center' (tomography.center)",
        "line 15, steps.slices.inputs.centre: tomography.reconstruct has no input 'centre'",
        "line 15, steps.slices.inputs.extra: tomography.reconstruct has no input 'extra'",
        "line 18, steps.write.inputs.center: 'write' gives outputs, but 'center' takes "
        "tomography.center",
        "line 18, steps.write.inputs.slices: no step named 'nowhere'",
        "line 19, steps.write.parameters: tomography.write takes no parameters",
        "line 20, steps.Bad-Name: a step name is lower-case letters",
        "steps.Bad-Name.inputs.plan: 'plan' gives tomography.plan, but 'plan' takes "
        "diffraction.plan",
        "one technique a flow; found diffraction, tomography",
        "the inputs form a cycle: write -> write",
    ]
    for message in expected:
        assert message in problems, f"{message!r} not in:\n{problems}"
    assert len(raised.value.problems) >= 14
    # and each kind of file-level mistake on its own
    with pytest.raises(SpecificationError, match="line 3: not valid YAML"):
        check_specification("steps:\n  plan: [unclosed\n")
    with pytest.raises(SpecificationError, match="expected a mapping of named steps"):
        check_specification("calypso: 1\nsteps: []\n")


def test_cli_check_export_save_show_diff_list_delete(tmp_path, capsys, catalogue_path):
    assert main(["flows", "export", "diffraction"]) == 0
    exported = capsys.readouterr().out
    first = tmp_path / "d1.yaml"
    first.write_text(exported)
    assert main(["flows", "check", str(first)]) == 0
    assert "valid diffraction flow, steps plan -> integrate -> write" in capsys.readouterr().out
    second = tmp_path / "d2.yaml"
    second.write_text(exported.replace("npt: 1000", "npt: 2000"))
    with acting_as(ALICE):
        for spec in (first, second):
            assert (
                main(["flows", "save", str(spec), "--name", "rings", "--proposal", "ih0001"]) == 0
            )
        assert "saved rings@2" in capsys.readouterr().out
        # Saving for a proposal needs membership of it.
        assert main(["flows", "save", str(first), "--name", "theirs", "--proposal", "ih0002"]) == 7
        assert "alice is not a member of proposal ih0002" in capsys.readouterr().err
    assert main(["flows", "show", "rings@1"]) == 0
    assert "npt: 1000" in capsys.readouterr().out
    assert main(["flows", "diff", "rings@1", "rings@2"]) == 0
    diff = capsys.readouterr().out
    assert "-      npt: 1000" in diff and "+      npt: 2000" in diff
    assert main(["flows", "diff", "rings@2", "rings"]) == 0  # the latest: the same
    assert capsys.readouterr().out == "rings@2 and rings@2 are the same flow\n"
    # Someone else may neither overwrite nor delete it; a member of the proposal may.
    with acting_as(MALLORY):
        assert main(["flows", "save", str(first), "--name", "rings"]) == 7
        assert main(["flows", "delete", "rings"]) == 7
        assert "belongs to alice" in capsys.readouterr().err
        # ... nor see it: another proposal's flows are not listed, shown or compared.
        assert main(["flows", "list"]) == 0 and "rings" not in capsys.readouterr().out
        for command in (["show", "rings@1"], ["diff", "rings@1", "rings@2"]):
            assert main(["flows", *command]) == 5
            assert "no saved flow rings@1" in capsys.readouterr().err
    with acting_as(BOB):
        assert main(["flows", "list"]) == 0
        assert "rings@2" in capsys.readouterr().out
        assert main(["flows", "delete", "rings"]) == 0
    assert main(["flows", "show", "rings"]) == 5
    # Names become folder and deployment names.
    for name in ("../up", "a b", "saved-flow", ""):
        assert main(["flows", "save", str(first), "--name", name]) == 2
        assert "flow name" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  x: {task: os.system}\n")
    assert main(["flows", "save", str(bad), "--name", "evil"]) == 2
    assert "unknown task 'os.system'" in capsys.readouterr().err


def test_the_owner_is_the_unix_account_and_an_altered_version_is_refused(
    tmp_path, capsys, catalogue_path
):
    import getpass
    import sqlite3

    assert main(["flows", "export", "diffraction"]) == 0
    spec = tmp_path / "d.yaml"
    spec.write_text(capsys.readouterr().out)
    assert main(["flows", "save", str(spec), "--name", "mine", "--proposal", "ih0001"]) == 0
    saved = capsys.readouterr().out
    assert f"owner {getpass.getuser()}" in saved and "sha256 " in saved
    assert main(["flows", "save", str(spec), "--name", "mine"]) == 0  # version 2
    capsys.readouterr()
    # One SQL UPDATE changes version 1 in place: noticed on every load, refused.
    with sqlite3.connect(catalogue_path) as db:
        db.execute(
            "UPDATE saved_flows SET specification = replace(specification, 'npt: 1000', "
            "'npt: 9') WHERE name = 'mine' AND version = 1"
        )
    for command in (["flows", "show", "mine@1"], ["flows", "run", "mine@1", str(tmp_path)]):
        assert main(command) == 5
        assert "saved flow mine@1 was changed in the registry after it was saved" in (
            capsys.readouterr().err
        )
    assert main(["flows", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ALTERED" in listing.splitlines()[0] and "ALTERED" not in listing.splitlines()[1]
    assert main(["flows", "show", "mine@2"]) == 0


def _main_dataset(url: str) -> np.ndarray:
    path, entry = url.split("::")
    with h5py.File(path, "r") as h5:
        node = h5[entry]
        name = node.attrs.get("signal", "data") if isinstance(node, h5py.Group) else None
        return node[name][()] if name else node[()]


def _saved_run(tmp_path, capsys, technique, raw, parameters, output) -> dict:
    spec = yaml.safe_load(_exported(technique, capsys))
    spec["steps"]["plan"]["parameters"].update(parameters)
    path = tmp_path / f"{technique}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["flows", "save", str(path), "--name", f"my-{technique}"]) == 0
    capsys.readouterr()
    code = main(["flows", "run", f"my-{technique}", str(raw), "--output", str(output), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    [variant] = result["variants"]
    return variant


def _first_provenance(h5: h5py.File) -> str:
    found: list[str] = []
    h5.visit(lambda name: found.append(name) if name.endswith("provenance/data") else None)
    return found[0]


def _exported(technique, capsys) -> str:
    assert main(["flows", "export", technique]) == 0
    return capsys.readouterr().out


# Summary entries that differ between two runs of the same flow: where they wrote, when.
_WHERE_AND_WHEN = {
    *("flow_run_id", "catalogue_id", "timings_s", "per_s", "frames_per_s", "workers"),
    *("outputs", "processed_dataset_dir", "png", "volume_dir"),
}


def test_every_built_in_flow_exported_saved_and_run_gives_the_same_output(
    tmp_path, capsys, user, diffraction_sample, on_shared_cluster
):
    from calypso.flows.samples.mx import write_mx_sample
    from calypso.flows.samples.spectroscopy import write_spectroscopy_sample
    from calypso.flows.samples.tomography import write_tomography_sample

    root = diffraction_sample.dataset.root
    mx = write_mx_sample(tmp_path / "mxroot", grid=(2, 3), dataset_number=5)
    cases = {
        "diffraction": (
            diffraction_sample.raw_dataset_dir,
            {
                "poni": str(diffraction_sample.calibration["poni"]),
                "mask": str(diffraction_sample.calibration["mask"]),
                "npt": 300,
            },
        ),
        "spectroscopy": (
            write_spectroscopy_sample(tmp_path / "xas", repeats=2).raw_dataset_dir,
            {},
        ),
        "tomography": (
            write_tomography_sample(
                tmp_path / "tomo", rows=4, columns=128, projections=180
            ).raw_dataset_dir,
            {},
        ),
        "mx": (mx.raw_dataset_dir, {"mask": str(mx.mask)}),
    }
    settings = load_settings()  # eight runs on one cluster
    for technique, (raw, parameters) in cases.items():
        base = Path(raw).parents[3]  # the session folder, inside the proposal
        built_in = run_technique(
            technique,
            str(raw),
            build_parameters(
                technique, [f"{k}={json.dumps(v)}" for k, v in parameters.items()], None
            ),
            None,
            str(base / "PROCESSED_DATA" / "builtin" / technique),
            settings,
        )
        mine = _saved_run(
            tmp_path, capsys, technique, raw, parameters, base / "PROCESSED_DATA" / "mine"
        )
        # One engine: the saved copy reports exactly what the built-in reports ...
        assert set(mine) == set(built_in) - {"wall_s"}, technique
        assert set(mine["timings_s"]) == set(built_in["timings_s"]), technique
        for key in set(mine) - _WHERE_AND_WHEN:
            assert mine[key] == built_in[key], (technique, key)
        # ... and writes the same results.
        outputs = mine["outputs"]
        assert len(outputs) == len(built_in["outputs"]), technique
        for mine, theirs in zip(outputs, built_in["outputs"], strict=True):
            np.testing.assert_array_equal(_main_dataset(mine), _main_dataset(theirs), technique)
        # The NeXus result records the specification and its version.
        with h5py.File(outputs[0].split("::")[0], "r") as h5:
            provenance = json.loads(h5[_first_provenance(h5)][()])
        assert provenance["user_flow"]["name"] == f"my-{technique}"
        assert provenance["user_flow"]["version"] == 1
        assert "task: " in provenance["user_flow"]["specification"]
    assert root.exists()


def test_a_sweep_of_five_centres_on_three_slices_runs_in_parallel(
    tmp_path, capsys, user, on_shared_cluster
):
    from calypso.flows.samples.tomography import write_tomography_sample

    sample = write_tomography_sample(tmp_path / "visitor", rows=16, columns=96, projections=120)
    true = sample.geometry.center_of_rotation
    spec = yaml.safe_load(_exported("tomography", capsys))
    spec["steps"]["plan"]["parameters"].update(
        rows=[6, 9],
        center_of_rotation={"start": round(true) - 2, "stop": round(true) + 2, "step": 1},
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["flows", "check", str(path)]) == 0
    assert "sweep of 5 variants" in capsys.readouterr().out
    assert main(["flows", "save", str(path), "--name", "cor-sweep"]) == 0
    capsys.readouterr()
    assert main(["flows", "run", "cor-sweep", str(sample.raw_dataset_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    variants = result["variants"]
    assert len(variants) == 5
    centres = sorted(v["sweep"]["plan.center_of_rotation"] for v in variants)
    assert centres == [round(true) + d for d in (-2, -1, 0, 1, 2)]
    folders = {v["processed_dataset_dir"] for v in variants}
    assert len(folders) == 5 and all("/sweep/center_of_rotation_" in f for f in folders)
    for variant in variants:
        volume = _main_dataset(variant["outputs"][0])
        assert volume.shape[0] == 3 and np.isfinite(volume).all()
        assert variant["center_of_rotation"] == variant["sweep"]["plan.center_of_rotation"]
    # In parallel: every variant had started before any had finished.
    from calypso.registry import SQLiteCatalogue

    records = SQLiteCatalogue(os.environ["CALYPSO_CATALOGUE__PATH"]).list(limit=5)
    assert max(r.started for r in records) <= min(r.finished for r in records)


def test_paths_that_leave_the_proposal_are_refused(tmp_path, capsys, user, diffraction_sample):
    spec = yaml.safe_load(_exported("diffraction", capsys))
    spec["steps"]["plan"]["parameters"]["poni"] = str(diffraction_sample.calibration["poni"])
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["flows", "save", str(path), "--name", "mine", "--proposal", "ih0001"]) == 0
    raw = diffraction_sample.raw_dataset_dir
    proposal = raw.parents[4]
    other = proposal.parent / "ih0002" / "id00" / "20261127" / "RAW_DATA" / "CeO2" / "CeO2_0001"
    other.mkdir(parents=True, exist_ok=True)
    (other / "CeO2_0001.h5").write_bytes((raw / "CeO2_0001.h5").read_bytes())
    escape = proposal / "id00" / "20261127" / "RAW_DATA" / "CeO2" / "CeO2_0099"
    escape.parent.mkdir(parents=True, exist_ok=True)
    if not escape.exists():
        escape.symlink_to(tmp_path)  # a symlink inside the proposal, pointing out of it
    cases = {
        "dotdot": ([str(raw / ".." / raw.name)], "'..' is not allowed"),
        "other proposal": ([str(other)], "belongs to proposal ih0002"),
        "output elsewhere": ([str(raw), "--output", str(tmp_path / "out")], "leads outside"),
        "symlink out": ([str(escape)], "leads outside proposal ih0001"),
    }
    for case, (arguments, message) in cases.items():
        code = main(["flows", "run", "mine", *arguments])
        err = capsys.readouterr().err
        assert code == 7 and message in err, (case, err)
    spec["steps"]["plan"]["parameters"]["mask"] = "/etc/passwd"
    path.write_text(yaml.safe_dump(spec))
    assert main(["flows", "save", str(path), "--name", "mine"]) == 0
    capsys.readouterr()
    assert main(["flows", "run", "mine", str(raw)]) == 7
    assert "steps.plan.parameters.mask /etc/passwd leads outside" in capsys.readouterr().err


# -- limits: a specification is small before anything is built from it ---------------

_TOMOGRAPHY = """\
calypso: 1
steps:
  plan:
    task: tomography.plan
    parameters:
{parameters}
  center: {{task: tomography.center_of_rotation, inputs: {{plan: plan}}}}
  slices: {{task: tomography.reconstruct, inputs: {{plan: plan, center: center}}}}
  write: {{task: tomography.write, inputs: {{plan: plan, center: center, slices: slices}}}}
"""
# A kilobyte that PyYAML expands into 10^9 items: once measured at 3.5 GB and a hung run.
_BILLION_LAUGHS = "      preview_cor_offsets: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]" + "".join(
    f", &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)
)
_BILLION_LAUGHS += "]"
_SWEPT = ("center_of_rotation", "delta_beta", "cor_search")  # 1000 values each: 10^9


def _tomography(*parameters: str) -> str:
    return _TOMOGRAPHY.format(parameters="\n".join(f"      {p}" for p in parameters))


def _refused(text: str, seconds: float = 2.0) -> str:
    """The problems of a specification that must be refused quickly (timed: once these
    were enumerated, a 10^9 sweep ended in a MemoryError)."""
    started = time.perf_counter()
    with pytest.raises(SpecificationError) as raised:
        check_specification(text, "big.yaml")
    assert time.perf_counter() - started < seconds
    return "\n".join(raised.value.problems)


def test_a_sweep_of_a_million_or_a_billion_variants_is_refused_by_counting():
    limit = "at most 1,000 variants (CALYPSO_USER_FLOWS__MAX_VARIANTS)"
    where = "line 6, steps.plan.parameters.center_of_rotation: bad range"
    million = _refused(_tomography("center_of_rotation: {start: 0, stop: 999999, step: 1}"))
    assert where in million and f"1,000,000 values: {limit}" in million
    # a tiny step is counted, not built: 10^9 values, or more than a float can count
    billion = _refused(_tomography("center_of_rotation: {start: 0, stop: 1, step: 1.0e-9}"))
    assert where in billion and f"1,000,000,001 values: {limit}" in billion
    countless = _refused(_tomography("center_of_rotation: {start: 0, stop: 1, step: 5.0e-324}"))
    assert f"countless values: {limit}" in countless
    # the product of several sweeps, each within the limit
    product = _refused(_tomography(*(f"{name}: {{start: 1, stop: 1000}}" for name in _SWEPT)))
    assert (
        "line 6, steps.plan.parameters.center_of_rotation: the sweep makes 1,000,000,000 "
        "variants (plan.center_of_rotation (1000) x plan.delta_beta (1000) x "
        "plan.cor_search (1000)): at most 1,000 (CALYPSO_USER_FLOWS__MAX_VARIANTS)"
    ) in product
    two = _refused(_tomography(*(f"{name}: {{start: 1, stop: 1000}}" for name in _SWEPT[:2])))
    assert "the sweep makes 1,000,000 variants" in two
    values = ", ".join(str(n) for n in range(1001))
    listed = _refused(_tomography(f"center_of_rotation: [{values}]"))
    assert "a sweep of 1,001 values: at most 1,000" in listed
    # Many values refused: one line says how many, and why the first is.
    negative = _refused(_tomography("chunk_rows: {start: 2, stop: -90, step: -1}"))
    assert negative.splitlines() == [
        "line 6, steps.plan.parameters.chunk_rows: 91 of the sweep's 93 values are refused, "
        "the first 0: Input should be greater than or equal to 1"
    ]


def test_the_variant_limit_is_a_setting(monkeypatch):
    five = _tomography("center_of_rotation: {start: 1, stop: 5}")
    assert len(check_specification(five).variants()) == 5
    monkeypatch.setenv("CALYPSO_USER_FLOWS__MAX_VARIANTS", "4")
    assert "5 values: at most 4 variants" in _refused(five)
    monkeypatch.setenv("CALYPSO_USER_FLOWS__MAX_VARIANTS", "2000")
    wide = _tomography("center_of_rotation: {start: 1, stop: 1500}")
    assert len(check_specification(wide).variants()) == 1500
    # given by the caller, the limits need no settings
    limits = load_settings().user_flows.model_copy(update={"max_variants": 2})
    with pytest.raises(SpecificationError, match="5 values: at most 2 variants"):
        check_specification(five, limits=limits)


def test_anchors_and_aliases_are_refused_before_anything_expands():
    import tracemalloc

    assert len(_BILLION_LAUGHS) < 1024
    tracemalloc.start()
    try:
        problems = _refused(_tomography(_BILLION_LAUGHS.strip()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # once 3.5 GB
    assert (
        "line 6, steps.plan.parameters.preview_cor_offsets: YAML anchors and aliases "
        "(&name, *name) are not allowed: a specification has no use for them"
    ) in problems
    # anywhere, even harmless, and an alias alone (no anchor to find) too
    for text in (
        "calypso: &one 1\nsteps: {}\n",
        _tomography("detector: *nowhere"),
        _tomography("<<: *merged"),
    ):
        assert "anchors and aliases" in _refused(text)


def test_oversized_documents_lists_strings_and_nesting_are_refused():
    padded = _tomography("center_of_rotation: 3") + "# " + "x" * 256 * 1024 + "\n"
    assert _refused(padded) == (
        "line 1, top: more than 262,144 bytes (CALYPSO_USER_FLOWS__MAX_DOCUMENT_BYTES); "
        "a specification is a few kilobytes"
    )
    offsets = ", ".join(["1"] * 10_001)
    assert _refused(_tomography(f"preview_cor_offsets: [{offsets}]"), seconds=10) == (
        "line 6, steps.plan.parameters.preview_cor_offsets: a list of 10,001 items: at most "
        "10,000 (CALYPSO_USER_FLOWS__MAX_LIST_ITEMS)"
    )
    long = _refused(_tomography(f"detector: {'x' * 5000}", f"filter_name: {'y' * 4097}"))
    assert long.splitlines() == [  # every one at once
        "line 6, steps.plan.parameters.detector: a value of 5,000 characters: at most 4,096 "
        "(CALYPSO_USER_FLOWS__MAX_STRING_CHARS)",
        "line 7, steps.plan.parameters.filter_name: a value of 4,097 characters: at most "
        "4,096 (CALYPSO_USER_FLOWS__MAX_STRING_CHARS)",
    ]
    # once a RecursionError traceback
    deep = _refused(_tomography(f"detector: {'[' * 100_000}"), seconds=10)
    assert deep == "line 6, steps.plan.parameters.detector: nested more than 32 levels deep"


def test_cli_check_refuses_what_is_over_the_limits(tmp_path, capsys):
    cases = {
        "billion.yaml": (
            _tomography(*(f"{name}: {{start: 1, stop: 1000}}" for name in _SWEPT)),
            "the sweep makes 1,000,000,000 variants",
        ),
        "laughs.yaml": (_tomography(_BILLION_LAUGHS.strip()), "anchors and aliases"),
        "huge.yaml": ("#" * 300_000, "more than 262,144 bytes"),
        "list.yaml": (
            _tomography(f"preview_cor_offsets: [{', '.join(['1'] * 10_001)}]"),
            "a list of 10,001 items",
        ),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert main(["flows", "check", str(path)]) == 2, name
        captured = capsys.readouterr()
        assert f"{path}: 1 problem(s):" in captured.err and message in captured.err, name
        assert "Traceback" not in captured.err and not captured.out


def test_batches_no_step_takes_are_finished_before_the_run_ends(
    tmp_path, capsys, user, on_shared_cluster, monkeypatch
):
    """A map's reduce step hands its batches on as they finish; a second reduce step whose
    batches no step takes still has them all finished (their part files written) before
    the run publishes and removes its part folder. The two steps write part files of the
    same names, each in a folder of its own (in one folder, HDF5 refused the second
    writer when both reached a batch at once)."""
    from calypso.flows.builtin import spectroscopy
    from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample

    folders = []

    def reduce(ctx, plan):
        folders.append(Path(ctx.work_dir))
        return reduce_in_place(ctx, plan)

    reduce_in_place = spectroscopy.reduce
    monkeypatch.setattr(spectroscopy, "reduce", reduce)

    raw = write_spectroscopy_map_sample(tmp_path / "xasmap", 200, seed=3).raw_dataset_dir
    spec = yaml.safe_load(_exported("spectroscopy", capsys))
    spec["steps"]["plan"]["parameters"]["batch_size"] = 40
    spec["steps"]["again"] = {"task": "spectroscopy.reduce", "inputs": {"plan": "plan"}}
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["flows", "save", str(path), "--name", "reduced-twice"]) == 0
    capsys.readouterr()
    output = Path(raw).parents[2] / "PROCESSED_DATA" / "twice"  # RAW_DATA beside it
    code = main(["flows", "run", "reduced-twice", str(raw), "--output", str(output), "--json"])
    [variant] = json.loads(capsys.readouterr().out)["variants"]
    assert code == 0
    assert variant["tasks"] == 10  # 5 batches taken by the writer, 5 finished unused
    assert variant["count"] == 200
    assert not list(output.glob(".calypso-partial-*"))  # nothing left writing in it
    assert [f.name for f in folders] == ["step-reduce", "step-again"]
    assert folders[0].parent == folders[1].parent
    assert folders[0].parent.name.startswith(".calypso-partial-")
