"""The dashboard's evaluation views: a version's evaluation against its parent (old and
new accuracy, the classes that got worse most, a confusion plot per evaluation set), and
a page comparing two versions side by side."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from server.dashboard import plots
from server.dashboard.router import TEMPLATES, SignedIn
from server.dependencies import ServicesDep, VersionId
from server.schemas import DB_INT_MAX
from store.evaluations import EvaluationInfo

router = APIRouter(prefix="/admin", include_in_schema=False)

OptionalVersion = Annotated[int | None, Query(ge=1, le=DB_INT_MAX)]


@router.get("/versions/{version_id}/evaluations/{set_id}/confusion.png")
async def confusion_plot(
    version_id: VersionId,
    set_id: Annotated[int, Path(ge=1, le=DB_INT_MAX)],
    services: ServicesDep,
    _: SignedIn,
) -> Response:
    evaluations = await asyncio.to_thread(services.store.evaluations.for_version, version_id)
    match = next((e for e in evaluations if e.evaluation_set.id == set_id), None)
    if match is None:
        raise HTTPException(404, f"version {version_id} has no evaluation on set {set_id}")
    confusion = match.results["confusion"]
    png = await asyncio.to_thread(
        plots.confusion, confusion["classes"], confusion["predicted"], confusion["counts"]
    )
    return Response(png, media_type="image/png")


@dataclass
class SetComparison:
    """Two versions' newest evaluations on one evaluation set (by name)."""

    name: str
    left: EvaluationInfo | None
    right: EvaluationInfo | None

    @property
    def rows(self) -> list[tuple[str, float | None, float | None]]:
        """(class, left accuracy, right accuracy) for every class either was evaluated on."""
        left = _by_class(self.left)
        right = _by_class(self.right)
        names = list(left) + [n for n in right if n not in left]
        return [(n, left.get(n), right.get(n)) for n in names]


def _by_class(evaluation: EvaluationInfo | None) -> dict[str, float | None]:
    if evaluation is None:
        return {}
    return {r["name"]: r["accuracy"] for r in evaluation.results["per_class"]}


def compare_sets(left: list[EvaluationInfo], right: list[EvaluationInfo]) -> list[SetComparison]:
    by_left = {e.evaluation_set.name: e for e in left}
    by_right = {e.evaluation_set.name: e for e in right}
    names = sorted(set(by_left) | set(by_right))
    return [SetComparison(n, by_left.get(n), by_right.get(n)) for n in names]


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(
    request: Request,
    services: ServicesDep,
    _: SignedIn,
    a: OptionalVersion = None,
    b: OptionalVersion = None,
) -> HTMLResponse:
    """Two versions side by side: classes, gate decisions, and accuracy per evaluation
    set and class. Without `a` and `b`: the form to pick them."""
    store = services.store

    def read() -> dict[str, Any]:
        versions = store.registry.list(limit=200)
        context: dict[str, Any] = {"versions": versions, "a": a, "b": b, "pair": None}
        if a is not None and b is not None:
            left, right = store.registry.get(a), store.registry.get(b)
            context["pair"] = (left, right)
            context["classes"] = (
                store.registry.class_names(a),
                store.registry.class_names(b),
            )
            context["sets"] = compare_sets(
                store.evaluations.for_version(a), store.evaluations.for_version(b)
            )
        return context

    context = await asyncio.to_thread(read)
    return TEMPLATES.TemplateResponse(request, "compare.html", context)
