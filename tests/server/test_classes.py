"""POST /classes (archives, labelled files, idempotency, every bad upload) and GET /classes."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import Server, colour_pngs
from tests.server.test_predict import huge_png, jpeg
from worker.dispatch import Dispatcher


class IdleDispatcher(Dispatcher):
    """Announces nothing: submitted jobs stay queued."""

    def submit(self, job_id: int) -> None:
        return None


def idle(settings: ServerSettings, store: Store) -> Dispatcher:
    return IdleDispatcher(store)


def zip_bytes(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in dirs:
            archive.writestr(zipfile.ZipInfo(name), b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def colour_files(colours: list[int], per_class: int = 4, prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{name}/{i}.png": data
        for i, (name, data) in enumerate(colour_pngs(colours, per_class, seed=3))
    }


def post_archive(
    server: Server, data: bytes, name: str = "task.zip", who: str = "admin", **kwargs: Any
) -> Any:
    return server.client.post(
        "/classes", files={"archive": (name, data)}, headers=server.headers(who), **kwargs
    )


def nothing_stored(server: Server) -> bool:
    tasks = Path(server.settings.objects_dir) / "tasks"
    return not server.store.jobs.list() and (not tasks.exists() or not any(tasks.rglob("*")))


def test_an_archive_is_learned_into_a_new_active_version(server: Server) -> None:
    response = post_archive(server, zip_bytes(colour_files([2, 3])))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["class_names"] == ["blue", "yellow"]
    assert body["image_counts"] == [4, 4]
    assert body["replayed"] is False
    assert body["job"]["state"] in ("queued", "running", "succeeded")
    job = server.wait_job(body["job_id"])
    assert job["state"] == "succeeded", job
    assert job["version_id"] == 2
    server.wait_ready(version_id=2)
    prediction = server.predict([jpeg()], top_k=4).json()
    assert prediction["version_id"] == 2
    assert {c["name"] for c in prediction["predictions"][0]["classes"]} == {
        "red",
        "green",
        "blue",
        "yellow",
    }

    classes = server.client.get("/classes", headers=server.headers("predict")).json()
    assert [(c["name"], c["version_id"], c["active"]) for c in classes] == [
        ("red", 1, True),
        ("green", 1, True),
        ("blue", 2, True),
        ("yellow", 2, True),
    ]
    assert classes[2]["task_id"] == body["task_id"]


def test_labelled_files_and_a_tar_gz_are_accepted(server_factory: Callable[..., Server]) -> None:
    server = server_factory(create_app_kwargs={"dispatcher_factory": idle})
    files = colour_pngs([2, 3], 3)
    response = server.client.post(
        "/classes",
        files=[("images", (f"{i}.png", data, "image/png")) for i, (_, data) in enumerate(files)],
        data={"labels": [name for name, _ in files], "activate": "false"},
        headers=server.headers(),
    )
    assert response.status_code == 202, response.text
    assert response.json()["class_names"] == ["blue", "yellow"]
    task = server.store.jobs.tasks.get(response.json()["task_id"])
    assert task.activate is False
    stored = server.store.uploads.load(task.uploads_location or "")
    assert sorted(u.class_name for u in stored) == ["blue"] * 3 + ["yellow"] * 3

    # A tar.gz with all class folders inside one top folder.
    response = post_archive(server, tar_bytes(colour_files([4, 5], 2, prefix="upload/")), "t.tgz")
    assert response.status_code == 202, response.text
    assert response.json()["class_names"] == ["cyan", "magenta"]
    assert response.json()["image_counts"] == [2, 2]


def test_junk_entries_are_skipped(server_factory: Callable[..., Server]) -> None:
    server = server_factory(create_app_kwargs={"dispatcher_factory": idle})
    files = colour_files([4], 2)
    files["__MACOSX/cyan/._0.png"] = b"resource fork"
    files["cyan/.DS_Store"] = b"finder"
    response = post_archive(server, zip_bytes(files))
    assert response.status_code == 202, response.text
    assert response.json()["image_counts"] == [2]


def _bad_uploads() -> dict[str, tuple[Callable[[], dict[str, Any]], int, str]]:
    good = colour_files([4, 5], 2)

    def archive(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"files": {"archive": ("task.zip", zip_bytes(files, dirs))}}

    def labelled(images: list[bytes], labels: list[str]) -> dict[str, Any]:
        return {
            "files": [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)],
            "data": {"labels": labels},
        }

    two = [d for _, d in colour_pngs([4], 2)]  # magenta
    return {
        "not an image": (
            lambda: archive({**good, "magenta/notes.png": b"just text"}),
            422,
            "not an image",
        ),
        "truncated image": (
            lambda: archive({**good, "magenta/cut.png": two[0][:200]}),
            422,
            "truncated",
        ),
        "decompression bomb": (
            lambda: archive({**good, "magenta/bomb.png": huge_png(7000, 7000)}),
            422,
            "over the limit",
        ),
        "absolute path": (lambda: archive({**good, "/etc/cyan/x.png": two[0]}), 422, "absolute"),
        "dot-dot": (lambda: archive({**good, "cyan/../../x.png": two[0]}), 422, "'..'"),
        "empty class": (lambda: archive(good, dirs=("empty/",)), 422, "no images"),
        "too few images": (
            lambda: archive({"magenta/0.png": two[0], **colour_files([5], 2)}),
            422,
            "at least 2",
        ),
        "learned class name": (lambda: archive(colour_files([0], 2)), 409, "'red' (learned)"),
        "empty label": (lambda: labelled(two, ["cyan", "  "]), 422, "empty"),
        "overlong class name": (lambda: labelled(two, ["c" * 101] * 2), 422, "at most 100"),
        "overlong folder name": (
            lambda: archive({f"{'c' * 101}/{i}.png": d for i, d in enumerate(two)}),
            422,
            "at most 100",
        ),
        "file outside a class folder": (
            lambda: archive({**good, "loose.png": two[0]}),
            422,
            "class folder",
        ),
        "labels do not match": (lambda: labelled(two, ["cyan"]), 422, "2 images but 1 labels"),
        "neither archive nor images": (
            lambda: {"files": {"activate": (None, "true")}},
            422,
            "archive",
        ),
        "unknown field": (
            lambda: {**labelled(two, []), "data": {"labels": ["cyan"] * 2, "colour": "x"}},
            422,
            "unknown field(s) 'colour'",
        ),
        "activate not a boolean": (
            lambda: {**labelled(two, []), "data": {"labels": ["cyan"] * 2, "activate": "maybe"}},
            422,
            "activate",
        ),
        "not multipart": (lambda: {"json": {"labels": ["cyan"]}}, 415, "multipart/form-data"),
        "not an archive": (
            lambda: {"files": {"archive": ("x.zip", b"plain bytes, no archive")}},
            422,
            "neither a zip nor a tar",
        ),
        "archive and images": (
            lambda: {
                "files": [
                    ("archive", ("task.zip", zip_bytes(good))),
                    ("images", ("0.png", two[0], "image/png")),
                ]
            },
            422,
            "not both",
        ),
        "symlink in tar": (
            lambda: {"files": {"archive": ("t.tar", _tar_with_link())}},
            422,
            "link",
        ),
    }


def _tar_with_link() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in colour_files([4, 5], 2).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cyan/passwd.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


BAD_UPLOADS = _bad_uploads()


@pytest.fixture
def idle_server(server_factory: Callable[..., Server]) -> Server:
    """Version 1 (red, green) active; jobs stay queued."""
    return server_factory(create_app_kwargs={"dispatcher_factory": idle})


def test_each_bad_upload_is_refused_and_nothing_is_stored(idle_server: Server) -> None:
    for case, (request, status, words) in BAD_UPLOADS.items():
        response = idle_server.client.post("/classes", headers=idle_server.headers(), **request())
        assert response.status_code == status, (case, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and words in detail, (case, detail)
        assert nothing_stored(idle_server), case


def test_a_queued_class_name_is_409(idle_server: Server) -> None:
    first = post_archive(idle_server, zip_bytes(colour_files([4], 2)))
    assert first.status_code == 202, first.text
    response = post_archive(idle_server, zip_bytes(colour_files([4, 5], 2)))
    assert response.status_code == 409
    assert f"'magenta' (queued in task {first.json()['task_id']})" in response.json()["detail"]
    assert len(idle_server.store.jobs.list()) == 1


def test_an_upload_over_the_size_limit_is_413(server_factory: Callable[..., Server]) -> None:
    server = server_factory(max_request_bytes=5_000, create_app_kwargs={"dispatcher_factory": idle})
    response = post_archive(server, zip_bytes(colour_files([4, 5], 4)))
    assert response.status_code == 413
    assert "DMC_MAX_REQUEST_BYTES" in response.json()["detail"]
    assert nothing_stored(server)


def test_an_archive_that_unpacks_too_large_is_413(server_factory: Callable[..., Server]) -> None:
    server = server_factory(
        max_extracted_bytes=3_000, create_app_kwargs={"dispatcher_factory": idle}
    )
    data = tar_bytes({**colour_files([4, 5], 4), "cyan/zeros.png": b"\0" * 50_000})
    response = post_archive(server, data, "t.tar.gz")
    assert response.status_code == 413
    assert "DMC_MAX_EXTRACTED_BYTES" in response.json()["detail"]
    assert nothing_stored(server)


def test_idempotency_key_replays_and_conflicts(idle_server: Server) -> None:
    headers = {**idle_server.headers(), "Idempotency-Key": "upload-1"}
    data = zip_bytes(colour_files([4, 5], 2))
    first = idle_server.client.post("/classes", files={"archive": ("a.zip", data)}, headers=headers)
    assert first.status_code == 202, first.text
    again = idle_server.client.post("/classes", files={"archive": ("a.zip", data)}, headers=headers)
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["replayed"] is True
    assert (again.json()["task_id"], again.json()["job_id"]) == (
        first.json()["task_id"],
        first.json()["job_id"],
    )
    other = zip_bytes(colour_files([4, 5], 3))
    conflict = idle_server.client.post(
        "/classes", files={"archive": ("a.zip", other)}, headers=headers
    )
    assert conflict.status_code == 409
    assert "upload-1" in conflict.json()["detail"]
    # The same classes and image counts, other images: a conflict too.
    files = colour_files([4, 5], 2)
    files["cyan/2.png"] = files["magenta/0.png"]
    same_counts = idle_server.client.post(
        "/classes", files={"archive": ("a.zip", zip_bytes(files))}, headers=headers
    )
    assert same_counts.status_code == 409, same_counts.text
    assert "images" in same_counts.json()["detail"]
    assert len(idle_server.store.jobs.list()) == 1
    locations = idle_server.store.jobs.tasks.uploads_locations()
    stored = {p.parent.name for p in (Path(idle_server.settings.objects_dir) / "tasks").glob("*/*")}
    assert len(locations) == 1 and len(stored) == 1


def test_get_classes_needs_a_key_and_lists_learned_classes(server: Server) -> None:
    assert server.client.get("/classes").status_code == 401
    response = server.client.get("/classes", headers=server.headers("predict"))
    assert response.status_code == 200
    assert [c["name"] for c in response.json()] == ["red", "green"]


def test_post_classes_needs_admin(server: Server) -> None:
    response = post_archive(server, zip_bytes(colour_files([4], 2)), who="predict")
    assert response.status_code == 403
    assert "'admin' scope" in response.json()["detail"]
