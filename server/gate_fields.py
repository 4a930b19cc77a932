"""The promotion gate's per-upload override: two optional form fields of POST /classes."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData

from server.errors import UploadError

_PERCENT: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": 100}
# Form field -> `store.evaluations.GateRule` key, with its OpenAPI schema.
GATE_FIELDS: dict[str, dict[str, Any]] = {
    "gate_max_old_drop": _PERCENT
    | {
        "description": "Promotion gate for this upload (replaces DMC_GATE_MAX_OLD_DROP): "
        "activate the version only if its accuracy on the old classes drops at most this "
        "many points against its parent on the evaluation sets."
    },
    "gate_min_new_accuracy": _PERCENT
    | {
        "description": "Promotion gate for this upload (replaces "
        "DMC_GATE_MIN_NEW_ACCURACY): activate the version only if its accuracy on the new "
        "classes on the evaluation sets is at least this many percent."
    },
}
_NUMBER = TypeAdapter(float)


def gate_override(form: FormData) -> dict[str, float] | None:
    """The gate fields present in `form` as a `GateRule` JSON (None when there are none);
    a value that is not one number from 0 to 100 is a 422."""
    override: dict[str, float] = {}
    for field in GATE_FIELDS:
        values = form.getlist(field)
        if not values:
            continue
        problem = f"`{field}` must be one number from 0 to 100"
        if len(values) > 1 or not isinstance(values[0], str):
            raise UploadError(422, problem)
        try:
            value = _NUMBER.validate_python(values[0])
        except ValidationError:
            raise UploadError(422, problem) from None
        if not 0 <= value <= 100:
            raise UploadError(422, problem)
        override[field.removeprefix("gate_")] = value
    return override or None
