"""API keys: 401 without a valid key, 403 without the scope, admin implies predict, the
bootstrap key, key management routes, revocation, and auth off for the embedded demo."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError

from server.settings import ServerSettings
from tests.server.conftest import Server
from tests.server.test_predict import jpeg

# (method, path) of every route that needs a key, and the scope it needs (None: any key).
PROTECTED: list[tuple[str, str, str | None]] = [
    ("GET", "/classes", None),
    ("POST", "/classes", "admin"),
    ("POST", "/predict", "predict"),
    ("GET", "/jobs", None),
    ("GET", "/jobs/1", None),
    ("POST", "/jobs/1/cancel", "admin"),
    ("GET", "/versions", None),
    ("GET", "/versions/1", None),
    ("POST", "/versions/1/activate", "admin"),
    ("GET", "/api-keys", "admin"),
    ("POST", "/api-keys", "admin"),
    ("DELETE", "/api-keys/1", "admin"),
]
OPEN = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"]


def test_every_protected_route_is_401_without_a_valid_key(server: Server) -> None:
    for method, path, _ in PROTECTED:
        for headers in ({}, {"X-API-Key": "dmc_not-a-key"}, {"X-API-Key": "x" * 500}):
            response = server.client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "APIKey"
            assert "X-API-Key" in response.json()["detail"]


def test_a_key_without_the_scope_is_403(server: Server) -> None:
    for method, path, scope in PROTECTED:
        if scope != "admin":
            continue
        response = server.client.request(method, path, headers=server.headers("predict"))
        assert response.status_code == 403, (method, path, response.text)
        assert "'admin' scope" in response.json()["detail"]


def test_open_routes_need_no_key(server: Server) -> None:
    for path in OPEN:
        assert server.client.get(path).status_code == 200, path


def test_scopes(server: Server) -> None:
    image = [jpeg()]
    assert server.predict(image, who="predict").status_code == 200
    assert server.predict(image, who="admin-db").status_code == 200  # admin implies predict
    assert server.predict(image, who="admin").status_code == 200  # the bootstrap key
    assert server.client.get("/versions", headers=server.headers("predict")).status_code == 200
    assert server.client.get("/api-keys", headers=server.headers("admin-db")).status_code == 200


def test_keys_are_created_listed_and_revoked(server: Server) -> None:
    created = server.client.post(
        "/api-keys", json={"name": "ci", "scopes": ["predict"]}, headers=server.headers()
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["scopes"] == ["predict"] and body["key"].startswith("dmc_")
    key = {"X-API-Key": body["key"]}
    assert server.client.get("/versions", headers=key).status_code == 200
    listed = server.client.get("/api-keys", headers=server.headers()).json()
    assert "ci" in [k["name"] for k in listed]
    assert all("key" not in k for k in listed)

    revoked = server.client.delete(f"/api-keys/{body['id']}", headers=server.headers())
    assert revoked.status_code == 204
    assert server.client.get("/versions", headers=key).status_code == 401
    assert server.client.delete(
        f"/api-keys/{body['id']}", headers=server.headers()
    ).status_code == (404)
    bad = server.client.post(
        "/api-keys", json={"name": "x", "scopes": ["root"]}, headers=server.headers()
    )
    assert bad.status_code == 422
    assert "scopes" in bad.json()["detail"]


def test_auth_can_be_turned_off_for_the_embedded_demo(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory(auth_enabled=False)
    server.wait_ready()
    assert server.client.get("/versions").status_code == 200
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    assert server.client.post("/predict", files=files).status_code == 200


def test_settings_refuse_unsafe_auth() -> None:
    with pytest.raises(ValidationError, match="embedded demo"):
        ServerSettings(auth_enabled=False, dispatcher="celery")
    with pytest.raises(ValidationError, match="at least 16"):
        ServerSettings(bootstrap_admin_key="short")
