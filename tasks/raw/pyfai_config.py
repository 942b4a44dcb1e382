"""pyFAI integration configurations as diffraction parameters.

pyFAI-integrate, pyFAI-calib2 ("save integration configuration") and ewoksxrpd users keep
their integration set-up in pyFAI's JSON configuration (the keys pyFAI's ``Worker``
reads: ``poni``, ``nbpt_rad``, ``unit``, ``method``, ``mask_file`` ...). pyFAI's own
reader (:class:`pyFAI.io.integration_config.WorkerConfig`) upgrades any version of it;
this module maps the result onto Calypso's parameter names, so ``--params config.json``
takes such a file as it is. What Calypso cannot do the same way is refused by name, never
dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calypso.errors import ParameterError

# Keys only pyFAI's configurations have (Calypso's own parameter files never use them).
_PYFAI_KEYS = frozenset(
    {"nbpt_rad", "nbpt_azim", "do_mask", "mask_file", "dark_current", "flat_field",
     "do_solid_angle", "do_polarization", "polarization_description", "val_dummy",
     "do_radial_range", "integrator_class", "integrator_method", "application"}
)  # fmt: skip


def is_pyfai_config(values: Mapping[str, Any]) -> bool:
    return bool(_PYFAI_KEYS & set(values))


def read_pyfai_config(values: Mapping[str, Any], source: str = "the configuration") -> dict | None:
    """Calypso's diffraction parameters from a pyFAI integration configuration, or None
    when ``values`` is not one (then they are Calypso's own names)."""
    if not is_pyfai_config(values):
        return None
    from pyFAI.io.integration_config import WorkerConfig

    try:
        config = WorkerConfig.from_dict(dict(values))
    except Exception as exc:  # pyFAI raises many kinds on a damaged configuration
        raise ParameterError(f"{source}: pyFAI cannot read this configuration: {exc}") from None
    parameters: dict[str, Any] = {}
    poni = values.get("poni")
    has_geometry = config.poni is not None and getattr(config.poni, "dist", None) is not None
    if isinstance(poni, str) and poni.strip() and not _overridden(poni, config.poni):
        parameters["poni"] = poni  # a PONI file, as it is (its spline found beside it)
    elif has_geometry:  # the file's own, or a PONI file's with keys of the file over it
        parameters["geometry"] = _geometry(config.poni)
    if config.nbpt_rad is not None:  # else Calypso's default, as for a PONI file
        parameters["npt"] = int(config.nbpt_rad)
    if config.nbpt_azim and int(config.nbpt_azim) > 1:
        parameters["npt_azim"] = int(config.nbpt_azim)
    if config.unit is not None:
        parameters["unit"] = str(getattr(config.unit, "name", config.unit))
    if config.method is not None:
        parameters["method"] = _available_method(
            config.method, 2 if "npt_azim" in parameters else 1
        )
    if config.integrator_method not in (None, *PLAIN_INTEGRATORS):
        _refuse(source, "integrator_name", config.integrator_method)
    polarization = config.polarization_description
    if polarization is not None and polarization.polarization_factor is not None:
        if polarization.axis_offset:
            _refuse(source, "polarization axis_offset", polarization.axis_offset)
        parameters["polarization_factor"] = float(polarization.polarization_factor)
    model = getattr(config.error_model, "name", config.error_model)
    parameters["error_model"] = None if model in (None, "NO") else str(model).lower()
    parameters["correct_solid_angle"] = bool(config.correct_solid_angle)
    for key, name in (("mask_file", "mask"), ("dark_current", "dark"), ("flat_field", "flat")):
        files = getattr(config, key)
        if isinstance(files, str) and "," in files and not Path(files).exists():
            files = [name.strip() for name in files.split(",") if name.strip()]  # pyFAI 0.x
        if isinstance(files, list | tuple):
            if len(files) > 1:
                raise ParameterError(
                    f"{source}: {key} names {len(files)} files; Calypso takes one: average "
                    f"them into one image (pyFAI-average) and name that"
                )
            files = files[0] if files else None
        if files:
            parameters[name] = _image_location(str(files), source, key)
    if config.val_dummy is not None:
        parameters["dummy"] = float(config.val_dummy)
    if config.delta_dummy is not None:
        parameters["delta_dummy"] = float(config.delta_dummy)
    for key in ("radial_range", "azimuth_range"):
        value = getattr(config, key)
        if value is not None:
            parameters[key] = [float(v) for v in value]
    if config.monitor_name:
        parameters["monitor"] = str(config.monitor_name)
    if config.normalization_factor not in (None, 1, 1.0):
        _refuse(source, "normalization_factor", config.normalization_factor, "monitor_reference")
    if config.integrator_class not in (None, "AzimuthalIntegrator"):
        _refuse(source, "integrator_class", config.integrator_class)
    if config.extra_options:
        _refuse(source, "extra_options", config.extra_options)
    if config.chi_discontinuity_at_0:
        _refuse(source, "chi_discontinuity_at_0", True, "azimuth_range")
    return parameters


# pyFAI's integrators that integrate and nothing more (sigma clipping, median filters and
# radial integrations are other reductions).
PLAIN_INTEGRATORS = ("integrate1d", "integrate1d_ng", "integrate2d", "integrate2d_ng")


def _available_method(method: Any, dim: int) -> list[str]:
    """The method pyFAI's Worker would run: the parts a configuration leaves open ('csr'
    in older files) chosen, an implementation this machine lacks (OpenCL) replaced."""
    from pyFAI.method_registry import IntegrationMethod

    found = IntegrationMethod.select_method(
        dim=dim, split=method.split, algo=method.algo, impl=method.impl, degradable=True
    )
    chosen = found[0] if found else IntegrationMethod.select_one_available(method, dim=dim)
    return [chosen.split_lower, chosen.algo_lower, chosen.impl_lower]


def _image_location(text: str, source: str, key: str) -> str:
    """A file named as pyFAI names it (a path, or a ``fabio:``/``silx:`` URL as recent
    pyFAI writes them) as Calypso names it: a path, or ``FILE.h5::/dataset``."""
    if not text.startswith(("fabio:", "silx:")):
        return text
    from silx.io.url import DataUrl

    url = DataUrl(text)
    if not url.is_valid() or not url.file_path():
        raise ParameterError(f"{source}: {key} {text!r} is not a file name or URL pyFAI reads")
    if url.data_slice() not in (None, (0,)):
        raise ParameterError(
            f"{source}: {key} {text!r} takes frame {url.data_slice()} of its file; Calypso "
            "takes an image file's first: save that frame on its own and name it"
        )
    return f"{url.file_path()}::{url.data_path()}" if url.data_path() else url.file_path()


def _overridden(poni_path: str, merged: Any) -> bool:
    """Whether keys of the configuration change the PONI file it names (pyFAI's Worker
    takes them over the file's: a wavelength, say)."""
    from pyFAI.io.ponifile import PoniFile

    try:
        alone = PoniFile(poni_path)
    except Exception:  # missing or damaged: the planner names it
        return False
    if getattr(merged, "dist", None) is None:  # pyFAI kept the path, merging nothing
        return False
    return _geometry(alone) != _geometry(merged)


def _geometry(poni: Any) -> dict[str, Any]:
    detector = poni.detector
    return {
        "dist": poni.dist,
        "poni1": poni.poni1,
        "poni2": poni.poni2,
        "rot1": poni.rot1 or 0.0,
        "rot2": poni.rot2 or 0.0,
        "rot3": poni.rot3 or 0.0,
        "wavelength": poni.wavelength,
        "detector": detector.__class__.__name__ if detector is not None else "Detector",
        "detector_config": detector.get_config() if detector is not None else {},
    }


def _refuse(source: str, key: str, value: Any, instead: str | None = None) -> None:
    hint = f"; use Calypso's {instead} instead" if instead else ""
    raise ParameterError(
        f"{source}: {key}={value!r} is not supported by Calypso's diffraction flow{hint} "
        "(remove it from the file to use the rest)"
    )


# -- files a calibration names: what confinement checks with it ------------------------

#: Keys of a pyFAI detector configuration that name a file (a NexusDetector's own file,
#: a distortion spline), compared in lower case.
_DETECTOR_FILE_KEYS = ("filename", "splinefile", "spline_file")


def detector_files(config: Mapping[str, Any] | str | None) -> list[tuple[str, str]]:
    """``(key, name)`` of the files a pyFAI detector configuration names.

    >>> detector_files({"splineFile": "distortion.spline", "pixel1": 1e-4})
    [('splineFile', 'distortion.spline')]
    """
    import json

    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return []
    if not isinstance(config, Mapping):
        return []
    return [
        (key, value)
        for key, value in config.items()
        if key.lower() in _DETECTOR_FILE_KEYS
        and isinstance(value, str)
        and value not in ("", "None")
    ]


def files_named_in(path: Path) -> list[tuple[str, Path]]:
    """``(key, file)`` of the files a PONI file names, where the diffraction plan opens
    them: its distortion spline (a relative name beside the PONI file, where pyFAI-calib
    keeps it) and its detector's own file (a NexusDetector's, opened as pyFAI opens it).
    Nothing for a file that is no PONI file.
    """
    try:  # a PONI file is a few hundred bytes: a mask or an image is not read whole
        with open(path, "rb") as stream:
            text = stream.read(65536).decode(errors="replace")
    except OSError:
        return []
    named: list[tuple[str, Path]] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not colon or line.startswith("#"):
            continue
        if key == "splinefile" and value not in ("", "None"):
            named.append(("SplineFile", path.parent / Path(value).expanduser()))
        elif key == "detector_config":
            for name, file in detector_files(value):
                beside = name.lower() != "filename"  # as the plan reads a spline
                named.append((name, path.parent / file if beside else Path(file).expanduser()))
    return named
