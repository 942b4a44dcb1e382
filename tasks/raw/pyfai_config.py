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
    if isinstance(poni, str):  # a path to a PONI file
        parameters["poni"] = poni
    elif config.poni is not None and getattr(config.poni, "dist", None) is not None:
        parameters["geometry"] = _geometry(config.poni)
    parameters["npt"] = int(config.nbpt_rad)
    if config.nbpt_azim and int(config.nbpt_azim) > 1:
        parameters["npt_azim"] = int(config.nbpt_azim)
    parameters["unit"] = str(getattr(config.unit, "name", config.unit))
    method = config.method
    if method is not None:
        parameters["method"] = [method.split, method.algo, method.impl]
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
        if isinstance(files, list | tuple):
            if len(files) > 1:
                raise ParameterError(
                    f"{source}: {key} names {len(files)} files; Calypso takes one: average "
                    f"them into one image (pyFAI-average) and name that"
                )
            files = files[0] if files else None
        if files:
            parameters[name] = str(files)
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
