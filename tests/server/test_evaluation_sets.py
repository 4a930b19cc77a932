"""POST /evaluation-sets (revisions, bad uploads), the evaluation a job runs on every new
version against its parent, and POST /versions/{id}/evaluate."""

from __future__ import annotations

from typing import Any

from tests.server.conftest import Server, colour_pngs
from tests.server.test_classes import colour_files, zip_bytes


def post_set(server: Server, name: str | None, files: dict[str, bytes], **extra: Any) -> Any:
    data = ({"name": name} if name is not None else {}) | extra
    return server.client.post(
        "/evaluation-sets",
        files={"archive": ("set.zip", zip_bytes(files), "application/zip")},
        data=data,
        headers=server.headers(),
    )


def add_task(server: Server, colours: list[int], **data: Any) -> dict[str, Any]:
    pairs = colour_pngs(colours, 6, seed=5)
    files = [("images", (f"{i}.png", png, "image/png")) for i, (_, png) in enumerate(pairs)]
    response = server.client.post(
        "/classes",
        files=files,
        data={"labels": [name for name, _ in pairs]} | data,
        headers=server.headers(),
    )
    assert response.status_code == 202, response.text
    return server.wait_job(response.json()["job_id"])


def test_sets_are_named_and_revisioned(server: Server) -> None:
    first = post_set(server, "held-out", colour_files([0, 1], per_class=2))
    assert first.status_code == 201, first.text
    assert first.json()["revision"] == 1
    assert first.json()["class_names"] == ["green", "red"]
    # Classes no version knows yet are kept (used once a version learns them).
    second = post_set(server, "held-out", colour_files([0, 1, 2], per_class=1))
    assert second.status_code == 201 and second.json()["revision"] == 2
    listed = server.client.get("/evaluation-sets", headers=server.headers("predict")).json()
    assert [(s["name"], s["revision"]) for s in listed] == [("held-out", 2), ("held-out", 1)]
    got = server.client.get(f"/evaluation-sets/{first.json()['id']}", headers=server.headers())
    assert got.json()["image_counts"] == [2, 2]


def test_bad_sets_are_refused_and_store_nothing(server: Server) -> None:
    files = colour_files([0], per_class=1)
    assert post_set(server, None, files).status_code == 422
    assert post_set(server, "  ", files).status_code == 422
    refused = post_set(server, "x", files, activate="true")
    assert refused.status_code == 422 and "activate" in refused.json()["detail"]
    broken = post_set(server, "x", {"red/0.png": b"not an image"})
    assert broken.status_code == 422
    keyed = server.client.post(
        "/evaluation-sets",
        data={"name": "x"},
        files={"archive": ("s.zip", zip_bytes(files), "application/zip")},
        headers=server.headers("predict"),
    )
    assert keyed.status_code == 403
    assert server.client.get("/evaluation-sets/99", headers=server.headers()).status_code == 404
    assert server.client.get("/evaluation-sets", headers=server.headers()).json() == []
    assert not list((server.settings.objects_dir / "evaluation-sets").glob("**/*.png"))


def test_a_job_evaluates_its_version_against_the_parent(server: Server) -> None:
    assert post_set(server, "colours", colour_files([0, 1, 2, 3], per_class=4)).status_code == 201
    job = add_task(server, [2, 3])
    assert job["state"] == "succeeded" and job["note"] is None, job
    version = server.client.get(f"/versions/{job['version_id']}", headers=server.headers()).json()
    assert version["active"] and version["metrics"]["gate"]["passed"]
    [evaluation] = version["evaluations"]
    assert evaluation["baseline_id"] == 1
    assert evaluation["overall"]["images"] == 16
    assert evaluation["old"]["images"] == 8 and evaluation["new"]["images"] == 8
    # The parent cannot name the new classes, so it got none of their images right.
    assert evaluation["new"]["parent_correct"] == 0
    assert [c["name"] for c in evaluation["per_class"]] == ["red", "green", "blue", "yellow"]
    counts = evaluation["confusion"]["counts"]
    assert sum(map(sum, counts)) == 16
    assert sum(counts[i][i] for i in range(4)) == evaluation["overall"]["correct"]


def test_evaluate_on_demand_uses_a_set_uploaded_later(server: Server) -> None:
    before = server.client.get("/versions/1", headers=server.headers()).json()
    assert before["evaluations"] == []
    post_set(server, "later", colour_files([0, 1, 4], per_class=2))
    response = server.client.post("/versions/1/evaluate", headers=server.headers())
    assert response.status_code == 200, response.text
    [evaluation] = response.json()["evaluations"]
    # Only the images of classes version 1 knows are used; it has no parent.
    assert evaluation["overall"]["images"] == 4 and evaluation["baseline_id"] is None
    assert evaluation["old"]["images"] == 0 and evaluation["new"]["images"] == 4
    assert server.client.get("/versions/1", headers=server.headers()).json()["evaluations"]
    assert server.client.post("/versions/7/evaluate", headers=server.headers()).status_code == 404
