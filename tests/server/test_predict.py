"""POST /predict: multipart and JSON input, top_k, pinned versions, and every bad input."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from server.app import _default_loader, create_app
from server.model import LoadedModel, Loader, Ranked
from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import ADMIN_KEY, Server, colour_pngs, png


def huge_png(width: int, height: int) -> bytes:
    """A tiny file that declares width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return png(Image.new("RGB", (48, 40), colour), fmt="JPEG")


def test_multipart_answers_top_k_with_the_active_version(server: Server) -> None:
    images = [data for _, data in colour_pngs([0, 1], 2)]
    response = server.predict(images, top_k=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version_id"] == 1
    assert [p["filename"] for p in body["predictions"]] == ["0.png", "1.png", "2.png", "3.png"]
    for prediction in body["predictions"]:
        classes = prediction["classes"]
        assert [c["name"] for c in classes] in (["red", "green"], ["green", "red"])
        probabilities = [c["probability"] for c in classes]
        assert probabilities == sorted(probabilities, reverse=True)
        assert abs(sum(probabilities) - 1.0) < 1e-4


def test_default_top_k_is_capped_at_the_class_count(server: Server) -> None:
    response = server.predict([jpeg()])
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["classes"]) == 2


def test_json_with_base64_and_a_data_url(server: Server) -> None:
    data = colour_pngs([0], 1)[0][1]
    payload = {
        "images": [
            base64.b64encode(data).decode(),
            "data:image/png;base64," + base64.b64encode(data).decode(),
        ],
        "top_k": 1,
    }
    response = server.client.post("/predict", json=payload, headers=server.headers("predict"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version_id"] == 1
    assert len(body["predictions"]) == 2
    assert all(len(p["classes"]) == 1 for p in body["predictions"])
    assert body["predictions"][0]["filename"] is None


def test_form_fields_set_top_k_and_version(server: Server) -> None:
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    response = server.client.post(
        "/predict", files=files, data={"top_k": "1"}, headers=server.headers("predict")
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["classes"]) == 1


def test_a_pinned_version_answers(server: Server) -> None:
    v2 = server.publish("v2", parent=1, activate=False)
    response = server.predict([jpeg()], version=v2.id, top_k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version_id"] == v2.id
    assert {c["name"] for c in body["predictions"][0]["classes"]} == {
        "red",
        "green",
        "blue",
        "yellow",
    }
    # The active version is unchanged.
    assert server.predict([jpeg()]).json()["version_id"] == 1


def test_an_unknown_version_is_404(server: Server) -> None:
    response = server.predict([jpeg()], version=99)
    assert response.status_code == 404
    assert "99" in response.json()["detail"]


def test_no_active_version_is_503_with_the_reason(server_factory: Callable[..., Server]) -> None:
    server = server_factory(publish=())
    response = server.predict([jpeg()])
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert "POST /classes" in response.json()["detail"] or "starting" in response.json()["detail"]


BAD_IMAGES: dict[str, tuple[bytes, str]] = {
    "not an image": (b"this is plain text, not a picture", "not an image"),
    "empty file": (b"", "empty"),
    "truncated png": (colour_pngs([0], 1)[0][1][:300], "truncated"),
    "truncated jpeg": (jpeg()[:400], "truncated"),
    "decompression bomb": (huge_png(7000, 7000), "over the limit"),
}


def test_each_bad_image_is_422_and_says_why(server: Server) -> None:
    for case, (data, words) in BAD_IMAGES.items():
        response = server.predict([jpeg(), data])
        assert response.status_code == 422, (case, response.text)
        assert words in response.json()["detail"], (case, response.json())


def test_bad_requests(server: Server) -> None:
    headers = server.headers("predict")
    cases: list[tuple[Callable[[], object], int, str]] = [
        (lambda: server.client.post("/predict", content=b"xx", headers=headers), 415, "multipart"),
        (
            lambda: server.client.post(
                "/predict", files={"other": ("a.jpg", jpeg())}, headers=headers
            ),
            422,
            "'images'",
        ),
        (
            lambda: server.client.post("/predict", json={"images": []}, headers=headers),
            422,
            "images",
        ),
        (
            lambda: server.client.post("/predict", json={"images": ["%%%"]}, headers=headers),
            422,
            "base64",
        ),
        (lambda: server.client.post("/predict", json={"top_k": 2}, headers=headers), 422, "images"),
        (lambda: server.predict([jpeg()], top_k=0), 422, "top_k"),
        (lambda: server.predict([jpeg()], top_k=1000), 422, "top_k"),
        (lambda: server.predict([jpeg()], version="abc"), 422, "version"),
        (
            lambda: server.client.post(
                "/predict",
                files={"images": ("a.jpg", jpeg())},
                data={"top_k": "many"},
                headers=headers,
            ),
            422,
            "top_k",
        ),
    ]
    for send, status, words in cases:
        response = send()
        assert response.status_code == status, response.text  # type: ignore[attr-defined]
        detail = response.json()["detail"]  # type: ignore[attr-defined]
        assert isinstance(detail, str) and words in detail, detail


def test_too_many_images_is_422(server_factory: Callable[..., Server]) -> None:
    server = server_factory(max_predict_images=3)
    server.wait_ready()
    response = server.predict([jpeg()] * 4)
    assert response.status_code == 422
    assert "at most 3" in response.json()["detail"]


def test_a_body_over_the_limit_is_413(server_factory: Callable[..., Server]) -> None:
    server = server_factory(max_request_bytes=20_000)
    server.wait_ready()
    big = png(Image.effect_noise((120, 120), 60).convert("RGB"))
    assert len(big) > 20_000
    response = server.predict([big])
    assert response.status_code == 413
    assert "DMC_MAX_REQUEST_BYTES" in response.json()["detail"]

    # Without a Content-Length: the streamed body is cut off once it goes over.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    response = server.client.post(
        "/predict",
        content=chunks(),
        headers={**server.headers("predict"), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "DMC_MAX_REQUEST_BYTES" in response.json()["detail"]


def test_a_failing_forward_pass_is_a_json_500(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path]
) -> None:
    def broken(store: Store, settings: ServerSettings) -> Loader:
        load = _default_loader(store, settings)

        def loader(version_id: int) -> LoadedModel:
            model = load(version_id)

            def fail(pixels: object, top_k: object) -> list[Ranked]:
                raise RuntimeError("CUDA error: an illegal memory access")

            model.rank = fail  # type: ignore[method-assign,assignment]
            return model

        return loader

    settings = settings_factory()
    store = Store.open(settings)
    store.registry.publish(
        states["v1"], parent_id=None, new_classes=["red", "green"], activate=True
    )
    store.close()
    app = create_app(settings, loader_factory=broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"X-API-Key": ADMIN_KEY}
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
        response = client.post("/predict", files=files, headers=headers)
        assert response.status_code == 500
        assert "RuntimeError" in response.json()["detail"]
        # The batcher goes on: the next request is answered (and fails the same way).
        assert client.post("/predict", files=files, headers=headers).status_code == 500


def test_a_replica_fetches_and_loads_only_the_inference_part(
    server: Server, tmp_path: Path
) -> None:
    v2 = server.publish("v2", parent=1, activate=False)
    states = {1: server.states["v1"], v2.id: server.states["v2"]}
    manifests = {
        v: json.loads((state / "manifest.json").read_text()) for v, state in states.items()
    }

    def part_bytes(version: int, part: str) -> int:
        files = manifests[version]["files"].values()
        return sum(f["size"] for f in files if f["part"] == part)

    # The training blobs of version 2 are gone from the store: a replica never reads them.
    for name, entry in manifests[v2.id]["files"].items():
        if entry["part"] == "training":
            server.store.objects.delete(v2.keys[name])
    activated = server.client.post(f"/versions/{v2.id}/activate", headers=server.headers())
    assert activated.status_code == 200, activated.text
    server.wait_ready(version_id=v2.id)
    response = server.predict([colour_pngs([2], 1)[0][1]], top_k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version_id"] == v2.id
    names = {c["name"] for c in body["predictions"][0]["classes"]}
    assert names == {"red", "green", "blue", "yellow"}

    # What a replica fetches is exactly the inference part: it does not grow with the memory.
    fetched = {}
    for version, state in states.items():
        out = server.store.registry.load_state(version, tmp_path / str(version), part="inference")
        fetched[version] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        manifest_size = (state / "manifest.json").stat().st_size
        assert fetched[version] == part_bytes(version, "inference") + manifest_size
    # The memory grew from v1 to v2, and none of it was fetched (the equality above): what
    # a replica fetches grows with the inference part alone.
    assert part_bytes(v2.id, "training") > part_bytes(1, "training") > 0
