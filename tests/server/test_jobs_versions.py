"""GET /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel; GET /versions, GET /versions/{id},
POST /versions/{id}/activate (rollback)."""

from __future__ import annotations

from collections.abc import Callable

from tests.server.conftest import Server
from tests.server.test_classes import colour_files, idle, post_archive, zip_bytes


def test_jobs_list_get_and_cancel(server_factory: Callable[..., Server]) -> None:
    server = server_factory(create_app_kwargs={"dispatcher_factory": idle})
    first = post_archive(server, zip_bytes(colour_files([4], 2))).json()
    second = post_archive(server, zip_bytes(colour_files([5], 2))).json()
    read = server.headers("predict")

    listed = server.client.get("/jobs", headers=read)
    assert listed.status_code == 200
    assert [j["id"] for j in listed.json()] == [second["job_id"], first["job_id"]]
    assert (
        server.client.get("/jobs", params={"limit": 1}, headers=read).json()[0]["id"]
        == (second["job_id"])
    )
    by_task = server.client.get("/jobs", params={"task_id": first["task_id"]}, headers=read)
    assert [j["id"] for j in by_task.json()] == [first["job_id"]]

    job = server.client.get(f"/jobs/{first['job_id']}", headers=read).json()
    assert job["state"] == "queued"
    assert job["progress"] == {"stage": "", "step": 0, "total": 0, "percent": 0.0}

    cancel = server.client.post(f"/jobs/{first['job_id']}/cancel", headers=server.headers())
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["state"] == "cancelled"
    queued = server.client.get("/jobs", params={"state": "queued"}, headers=read).json()
    assert [j["id"] for j in queued] == [second["job_id"]]
    both = server.client.get(
        "/jobs", params=[("state", "queued"), ("state", "cancelled")], headers=read
    ).json()
    assert len(both) == 2

    again = server.client.post(f"/jobs/{first['job_id']}/cancel", headers=server.headers())
    assert again.status_code == 409
    assert "cancelled" in again.json()["detail"]
    # A cancelled task's classes can be uploaded again.
    assert post_archive(server, zip_bytes(colour_files([4], 2))).status_code == 202


def test_job_errors(server: Server) -> None:
    read = server.headers("predict")
    missing = server.client.get("/jobs/999", headers=read)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "job 999 does not exist"}
    assert server.client.post("/jobs/999/cancel", headers=server.headers()).status_code == 404
    bad = server.client.get("/jobs/0", headers=read)
    assert bad.status_code == 422
    assert "job_id" in bad.json()["detail"]
    state = server.client.get("/jobs", params={"state": "sleeping"}, headers=read)
    assert state.status_code == 422
    assert "state" in state.json()["detail"]
    assert server.client.post("/jobs/1/cancel", headers=read).status_code == 403


def test_versions_list_get_activate_and_rollback(server: Server) -> None:
    read = server.headers("predict")
    v2 = server.publish("v2", parent=1, activate=False)
    versions = server.client.get("/versions", headers=read).json()
    assert [(v["id"], v["active"]) for v in versions] == [(v2.id, False), (1, True)]
    assert versions[0]["new_classes"] == ["blue", "yellow"]
    assert versions[0]["class_count"] == 4
    assert versions[0]["parent_id"] == 1

    one = server.client.get("/versions/1", headers=read).json()
    assert one["id"] == 1 and one["active"] is True and one["new_classes"] == ["red", "green"]
    assert one["size_bytes"] > 0 and len(one["checksum"]) == 64
    assert one["added_bytes"] == one["size_bytes"]  # the first version stores everything
    # The same state published again shares every blob: it adds nothing.
    again = server.store.registry.publish(server.states["v2"], parent_id=v2.id)
    body = server.client.get(f"/versions/{again.id}", headers=read).json()
    assert body["added_bytes"] == 0 and body["size_bytes"] == versions[0]["size_bytes"] > 0
    assert 0 < versions[0]["added_bytes"] <= versions[0]["size_bytes"]

    activated = server.client.post(f"/versions/{v2.id}/activate", headers=server.headers())
    assert activated.status_code == 200, activated.text
    assert activated.json()["active"] is True
    server.wait_ready(version_id=v2.id)
    assert server.predict([colour_png()]).json()["version_id"] == v2.id

    rollback = server.client.post("/versions/1/activate", headers=server.headers("admin-db"))
    assert rollback.status_code == 200
    server.wait_ready(version_id=1)
    assert server.predict([colour_png()]).json()["version_id"] == 1
    classes = server.client.get("/classes", headers=read).json()
    # The active version's classes: blue and yellow live only on the abandoned branch.
    assert {c["name"]: c["active"] for c in classes} == {"red": True, "green": True}


def test_version_errors(server: Server) -> None:
    read = server.headers("predict")
    assert server.client.get("/versions/42", headers=read).status_code == 404
    missing = server.client.post("/versions/42/activate", headers=server.headers())
    assert missing.status_code == 404
    assert missing.json()["detail"] == "model version 42 does not exist"
    assert server.client.post("/versions/1/activate", headers=read).status_code == 403
    assert server.client.get("/versions", params={"limit": 0}, headers=read).status_code == 422


def test_ids_and_offsets_past_the_database_integer_are_422(server: Server) -> None:
    """Past INTEGER they would overflow the database driver; they are refused up front."""
    admin = server.headers()
    huge = 2**31
    requests = [
        ("GET", f"/jobs/{huge}", {}),
        ("POST", f"/jobs/{huge}/cancel", {}),
        ("GET", f"/versions/{huge}", {}),
        ("POST", f"/versions/{huge}/activate", {}),
        ("DELETE", f"/api-keys/{10**28}", {}),
        ("GET", "/versions", {"offset": 10**25}),
        ("GET", "/jobs", {"offset": huge}),
        ("GET", "/jobs", {"task_id": huge}),
        ("POST", "/predict", {"version": huge}),
    ]
    for method, path, params in requests:
        response = server.client.request(method, path, params=params, headers=admin)
        assert response.status_code == 422, (method, path, params, response.text)
        assert str(2**31 - 1) in response.json()["detail"], response.text
    assert server.client.get(f"/jobs/{huge - 1}", headers=admin).status_code == 404


def test_a_405_allows_every_method_of_the_path(server: Server) -> None:
    for path, allowed in [
        ("/api-keys", "GET, HEAD, POST"),
        ("/classes", "GET, HEAD, POST"),
        ("/jobs/1", "GET, HEAD"),
    ]:
        response = server.client.request("PATCH", path, headers=server.headers())
        assert response.status_code == 405
        assert response.headers["allow"] == allowed


def colour_png() -> bytes:
    return next(iter(colour_files([0], 1).values()))
