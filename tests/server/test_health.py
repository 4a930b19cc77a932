"""GET /healthz, GET /readyz, GET /metrics, and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
        "database": True,
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


def test_readyz_is_503_when_the_database_does_not_answer(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = server.client.app.state.services.store.db  # type: ignore[attr-defined]

    @contextmanager
    def broken() -> Iterator[None]:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        yield

    monkeypatch.setattr(db, "read", broken)
    response = server.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] is False
    assert "connection refused" in body["reason"]
    assert body["version_id"] == 1  # the loaded model is still there


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
