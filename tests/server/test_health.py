"""GET /healthz, GET /readyz, GET /metrics, and the OpenAPI document."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from tests.server.conftest import Server
from tests.server.test_classes import colour_files, idle, post_archive, zip_bytes
from tests.server.test_predict import jpeg


def test_healthz_and_readyz(server: Server) -> None:
    assert server.client.get("/healthz").json() == {"status": "ok"}
    ready = server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "version_id": 1,
        "active_version_id": 1,
        "loading_version_id": None,
        "device": "cpu",
        "database": True,
        "database_error": None,
        "error": None,
        "reason": None,
    }


def test_readyz_is_503_without_a_version(server_factory: Callable[..., Server]) -> None:
    server = server_factory(publish=())
    server.client.get("/healthz")
    response = server.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready" and body["database"] is True
    assert body["reason"]


def test_readyz_is_ready_while_the_database_does_not_answer(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness means "can serve predictions": a database outage must not take every
    replica out of the load balancer at once. Its details only with an admin key."""
    db = server.client.app.state.services.store.db  # type: ignore[attr-defined]
    assert server.predict([jpeg()]).status_code == 200  # the key is known

    @contextmanager
    def broken() -> Iterator[None]:
        raise OperationalError("SELECT 1", {}, Exception("connection refused at db.internal"))
        yield

    monkeypatch.setattr(db, "read", broken)
    response = server.client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["reason"] is None
    assert body["database"] is False
    assert body["version_id"] == 1  # the loaded model still answers
    assert "db.internal" not in response.text
    services = server.client.app.state.services  # type: ignore[attr-defined]
    services.auth.cache_seconds = 1e-9  # expired: the key is asked for, and the store fails
    assert server.predict([jpeg()]).status_code == 200
    unknown = server.predict([jpeg()], who="admin-db")  # never verified: cannot be now
    assert unknown.status_code == 503 and unknown.headers["Retry-After"] == "1"
    admin = server.client.get("/readyz", headers=server.headers()).json()
    assert "connection refused at db.internal" in admin["database_error"]
    predictor = server.client.get("/readyz", headers=server.headers("predict")).json()
    assert "db.internal" not in str(predictor)


def test_readyz_shows_why_a_version_failed_to_load_only_to_an_admin(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory(publish=())
    services = server.client.app.state.services  # type: ignore[attr-defined]
    services.holder.loader = _failing_loader
    server.publish("v1", parent=None)
    deadline = time.monotonic() + 30
    while server.client.get("/readyz").json()["reason"] in (None, *_STARTING):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    anonymous = server.client.get("/readyz")
    assert anonymous.status_code == 503
    assert "could not be loaded" in anonymous.json()["reason"]
    assert "bucket-7" not in anonymous.text
    admin = server.client.get("/readyz", headers=server.headers())
    assert "s3://bucket-7/blobs/ab" in admin.json()["reason"]


_STARTING = (
    "the server is starting: the active version is being looked up",
    "the active version 1 is loading",
    "no version is active yet: add classes with POST /classes and wait for the job to finish",
)


def _failing_loader(version_id: int) -> Any:
    raise OSError("s3://bucket-7/blobs/ab is unreachable")


def test_metrics(server_factory: Callable[..., Server]) -> None:
    server = server_factory(create_app_kwargs={"dispatcher_factory": idle})
    server.wait_ready()
    assert server.predict([jpeg(), jpeg()]).status_code == 200
    assert server.client.get("/jobs/77", headers=server.headers()).status_code == 404
    post_archive(server, zip_bytes(colour_files([4], 2)))
    text = server.client.get("/metrics").text
    for line in (
        'dmc_http_requests_total{method="POST",route="/predict",status="200"} 1.0',
        'dmc_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0',
        'dmc_http_request_duration_seconds_count{method="POST",route="/predict"} 1.0',
        "dmc_predict_batch_size_count 1.0",
        "dmc_predict_batch_size_sum 2.0",
        "dmc_predict_queue_depth 0.0",
        "dmc_predict_images_total 2.0",
        "dmc_model_version 1.0",
        'dmc_model_loads_total{outcome="success"} 1.0',
        'dmc_jobs{state="queued"} 1.0',
        'dmc_jobs{state="succeeded"} 0.0',
    ):
        assert line in text, line
    assert server.client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_openapi_documents_every_error(server: Server) -> None:
    spec = server.client.get("/openapi.json").json()
    assert server.client.get("/docs").status_code == 200
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    expected = {
        ("post", "/classes"): {"202", "401", "403", "409", "413", "422"},
        ("get", "/classes"): {"200", "401", "403"},
        ("post", "/predict"): {"200", "401", "403", "404", "413", "415", "422", "503"},
        ("get", "/jobs"): {"200", "401", "403", "422"},
        ("get", "/jobs/{job_id}"): {"200", "401", "403", "404", "422"},
        ("post", "/jobs/{job_id}/cancel"): {"200", "401", "403", "404", "409", "422"},
        ("get", "/versions"): {"200", "401", "403", "422"},
        ("get", "/versions/{version_id}"): {"200", "401", "403", "404", "422"},
        ("post", "/versions/{version_id}/activate"): {"200", "401", "403", "404", "422"},
        ("get", "/readyz"): {"200", "503"},
    }
    for (method, path), codes in expected.items():
        documented = set(spec["paths"][path][method]["responses"])
        assert codes <= documented, (method, path, documented)
    for path, methods in spec["paths"].items():
        for operation in methods.values():
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")) and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (path, code)
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
