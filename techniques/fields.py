"""What the techniques' parameter models share: the fields that name files say so.

A parameter that names a file makes a flow read that file, so confinement (a
user flow reads only inside its proposal) must check it; guessing from the
value (a slash, a leading ``~``) misses relative paths and catches counter
names. Such a field carries a marker in its JSON schema instead, where forms
and clients see it too:

- ``json_schema_extra={"path": "file"}``: the path of a file (a mask, a PONI file);
- ``json_schema_extra={"path": "glob"}``: a file-name pattern, matched under the
  raw dataset's folder (relative to it, never absolute).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

PathKind = Literal["file", "glob"]


class TechniqueParameters(BaseModel):
    """Base of the parameter models: lists the fields marked as paths.

    Examples
    --------
    >>> from calypso.techniques.diffraction import DiffractionParameters
    >>> DiffractionParameters.path_fields()
    ['poni', 'mask', 'dark', 'flat']
    """

    @classmethod
    def path_fields(cls) -> list[str]:
        """Names of the fields that hold the path of a file, in field order."""
        return cls._marked("file")

    @classmethod
    def glob_fields(cls) -> list[str]:
        """Names of the fields that hold a file-name pattern under the raw dataset's folder."""
        return cls._marked("glob")

    @classmethod
    def _marked(cls, kind: PathKind) -> list[str]:
        return [
            name
            for name, field in cls.model_fields.items()
            if isinstance(field.json_schema_extra, dict)
            and field.json_schema_extra.get("path") == kind
        ]


def path_values(
    model: type[BaseModel] | None, values: Mapping[str, Any]
) -> list[tuple[str, PathKind, str]]:
    """``(field, kind, value)`` for every value of ``values`` given to a field that ``model``
    marks as a path (each item of a list: a swept path); what confinement checks.

    Examples
    --------
    >>> from calypso.techniques.mx import MXParameters
    >>> path_values(MXParameters, {"mask": "/data/m.edf", "images": "*.cbf", "d_min": 2})
    [('mask', 'file', '/data/m.edf'), ('images', 'glob', '*.cbf')]
    """
    if model is None or not hasattr(model, "_marked"):
        return []
    kinds: dict[str, PathKind] = {name: "file" for name in model._marked("file")}
    kinds |= {name: "glob" for name in model._marked("glob")}
    found: list[tuple[str, PathKind, str]] = []
    for name, value in values.items():
        if name not in kinds:
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str) or hasattr(item, "__fspath__"):
                found.append((name, kinds[name], str(item)))
    return found
