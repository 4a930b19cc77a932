"""The class lifecycle over HTTP: updates build on the active version (a rollback lasts),
extend (POST /classes/{name}/images, POST /classes mode=extend), remove (DELETE
/classes/{name}), rename (PATCH /classes/{name}) and DELETE /versions/{id}, each a job
that makes a new version; and the 4xx answers that change nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.server.conftest import Server, colour_pngs
from tests.server.test_classes import (
    colour_files,
    idle,
    nothing_stored,
    post_archive,
    zip_bytes,
)


def _done(server: Server, response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    job = server.wait_job(response.json()["job_id"])
    assert job["state"] == "succeeded", job["error"]
    return server.client.get(f"/versions/{job['version_id']}", headers=server.headers()).json()


def _classes(server: Server) -> list[str]:
    return [c["name"] for c in server.client.get("/classes", headers=server.headers()).json()]


def _files(colours: list[int], per_class: int, labels: bool = True) -> dict[str, Any]:
    pairs = colour_pngs(colours, per_class, seed=7)
    body: dict[str, Any] = {
        "files": [("images", (f"{i}.png", data, "image/png")) for i, (_, data) in enumerate(pairs)]
    }
    if labels:
        body["data"] = {"labels": [name for name, _ in pairs]}
    return body


def test_after_a_rollback_an_upload_builds_on_the_active_version(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory(publish=("v1", "v2"))  # v1: red, green; v2: + blue, yellow
    server.wait_ready(version_id=2)
    server.client.post("/versions/1/activate", headers=server.headers())
    # Blue lives only on the abandoned branch: learning it again is allowed.
    version = _done(server, post_archive(server, zip_bytes(colour_files([2], 4))))
    assert version["parent_id"] == 1 and version["active"]
    assert version["change"] == {"kind": "add", "classes": ["blue"], "renamed": {}}
    assert _classes(server) == ["red", "green", "blue"]
    # Building on an explicit version: v2's lineage already has blue.
    refused = server.client.post(
        "/classes",
        files={"archive": ("a.zip", zip_bytes(colour_files([2], 4)))},
        data={"base_version": "2"},
        headers=server.headers(),
    )
    assert refused.status_code == 409, refused.text
    assert "blue" in refused.json()["detail"]


def test_extend_remove_and_rename_make_versions(server: Server) -> None:
    headers = server.headers()
    # Labels may be left out: every image is of the class in the path.
    extended = _done(
        server,
        server.client.post(
            "/classes/green/images", headers=headers, **_files([1], 4, labels=False)
        ),
    )
    assert extended["change"]["kind"] == "extend" and extended["parent_id"] == 1
    assert extended["metrics"]["images_per_class"] == {"green": 4}
    several = server.client.post(
        "/classes",
        headers=headers,
        data={"mode": "extend"} | _files([0, 1], 3)["data"],
        files=_files([0, 1], 3)["files"],
    )
    assert _done(server, several)["change"]["classes"] == ["green", "red"]

    removed = _done(server, server.client.delete("/classes/red", headers=headers))
    assert removed["change"] == {"kind": "remove", "classes": ["red"], "renamed": {}}
    renamed = _done(
        server, server.client.patch("/classes/green", json={"name": "lime"}, headers=headers)
    )
    assert renamed["change"]["renamed"] == {"green": "lime"}
    assert _classes(server) == ["lime"]
    server.wait_ready(version_id=renamed["id"])
    images = [data for _, data in colour_pngs([0, 1], 2, seed=9)]
    answer = server.predict(images, top_k=5).json()
    assert {c["name"] for p in answer["predictions"] for c in p["classes"]} == {"lime"}
    # A removed name can be added again.
    readded = _done(server, post_archive(server, zip_bytes(colour_files([0], 4))))
    assert readded["change"]["classes"] == ["red"] and _classes(server) == ["lime", "red"]


def test_bad_class_changes_are_4xx_and_change_nothing(server: Server) -> None:
    headers = server.headers()
    assert server.client.delete("/classes/unknown", headers=headers).status_code == 404
    taken = server.client.patch("/classes/green", json={"name": "red"}, headers=headers)
    assert taken.status_code == 409, taken.text
    blank = server.client.patch("/classes/green", json={"name": "  "}, headers=headers)
    assert blank.status_code == 422, blank.text
    other = server.client.post("/classes/green/images", headers=headers, **_files([0], 2))
    assert other.status_code == 422 and "'red'" in other.json()["detail"]
    unknown = server.client.post(
        "/classes",
        headers=headers,
        data={"mode": "extend"},
        files={"archive": ("a.zip", zip_bytes(colour_files([4], 2)))},
    )
    assert unknown.status_code == 404, unknown.text
    bad_mode = server.client.post(
        "/classes",
        headers=headers,
        data={"mode": "merge"},
        files={"archive": ("a.zip", zip_bytes(colour_files([4], 2)))},
    )
    assert bad_mode.status_code == 422
    assert (
        server.client.delete("/classes/red", headers=server.headers("predict")).status_code == 403
    )
    assert nothing_stored(server)


def test_a_removal_is_idempotent_by_key(server_factory: Callable[..., Server]) -> None:
    server = server_factory(create_app_kwargs={"dispatcher_factory": idle})  # jobs stay queued
    headers = server.headers() | {"Idempotency-Key": "remove-red-once"}
    first = server.client.delete("/classes/red", headers=headers)
    again = server.client.delete("/classes/red", headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["job_id"] == first.json()["job_id"]
    other = server.client.delete("/classes/green", headers=headers)
    assert other.status_code == 409
    # Without a key, a second change of a class a queued task removes is refused.
    for change in (
        server.client.delete("/classes/red", headers=server.headers()),
        server.client.patch("/classes/red", json={"name": "ruby"}, headers=server.headers()),
    ):
        assert change.status_code == 409 and "task 1" in change.json()["detail"]
    assert len(server.store.jobs.list()) == 1


def test_delete_a_version(server_factory: Callable[..., Server]) -> None:
    server = server_factory(publish=("v1", "v2"))
    headers = server.headers()
    active = server.client.delete("/versions/2", headers=headers)
    assert active.status_code == 409 and "active" in active.json()["detail"]
    with_child = server.client.delete("/versions/1", headers=headers)
    assert with_child.status_code == 409 and "build on it" in with_child.json()["detail"]
    server.client.post("/versions/1/activate", headers=headers)
    assert server.client.delete("/versions/2", headers=headers).json() == {"deleted": [2]}
    assert server.client.delete("/versions/2", headers=headers).status_code == 404
    assert [v["id"] for v in server.client.get("/versions", headers=headers).json()] == [1]
