"""Schemathesis hooks of the contract test (loaded by `st run` through schemathesis.toml):
in the stateful phase, a schema-valid `POST /classes` is sent with real images under new
class names, so that the task is accepted and the links to its job and version get real
ids. The body is replaced at the call (not in the generated case), so the case keeps its
generation-time validity."""

from __future__ import annotations

import itertools
from typing import Any

import schemathesis
from urllib3 import encode_multipart_formdata

from tests.server.conftest import colour_pngs

_uploads = itertools.count(1)


@schemathesis.hook.apply_to(method="POST", path="/classes")  # type: ignore[attr-defined]
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    meta = case.meta
    if meta is None or meta.phase.name != "stateful" or not meta.generation.mode.is_positive:
        return
    n = next(_uploads)
    pairs = colour_pngs([0, 1], per_class=2, seed=n)
    fields: list[tuple[str, Any]] = [
        ("images", (f"{i}.png", data, "image/png")) for i, (_, data) in enumerate(pairs)
    ]
    fields += [("labels", f"upload{n}-{name}") for name, _ in pairs]
    body, content_type = encode_multipart_formdata(fields)
    kwargs["data"] = body
    case.headers["Content-Type"] = content_type  # undeclared: the case stays valid
