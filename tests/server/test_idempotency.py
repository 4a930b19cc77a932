"""Idempotent retries across replicas: two apps on one PostgreSQL database receive the
same `Idempotency-Key` at once, and every request gets the first one's answer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import Server
from tests.server.test_classes import colour_files, idle, zip_bytes
from tests.services import postgres_database

REPLICAS = 2
CLIENTS_PER_REPLICA = 8
ROUNDS = 8


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_database("dmc_idempotency") as url:
        yield url


@pytest.fixture
def replicas(
    database_url: str, server_factory: Callable[..., Server], tmp_path: Path
) -> list[Server]:
    """Two apps on one database and one object folder (torn down before the database)."""
    return [
        server_factory(
            publish=(),
            create_app_kwargs={"dispatcher_factory": idle},
            database_url=database_url,
            objects_dir=tmp_path / "objects",
        )
        for _ in range(REPLICAS)
    ]


def _burst(replicas: list[Server], key: str, data: bytes) -> list[Any]:
    """CLIENTS_PER_REPLICA requests to each replica, released at once."""
    clients = [r for r in replicas for _ in range(CLIENTS_PER_REPLICA)]
    barrier = threading.Barrier(len(clients))
    answers: list[Any] = [None] * len(clients)

    def send(index: int, replica: Server) -> None:
        headers = {**replica.headers(), "Idempotency-Key": key}
        barrier.wait(timeout=30)
        answers[index] = replica.client.post(
            "/classes", files={"archive": ("a.zip", data)}, headers=headers
        )

    threads = [threading.Thread(target=send, args=item) for item in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_one_key_sent_to_every_replica_at_once_gets_the_first_answer(
    replicas: list[Server],
) -> None:
    for round_ in range(ROUNDS):
        data = zip_bytes(colour_files([4, 5], 2, prefix=f"round{round_}-"))
        answers = _burst(replicas, f"retry-{round_}", data)
        statuses = [a.status_code for a in answers]
        assert statuses == [202] * len(answers), [a.text for a in answers if a.status_code != 202]
        bodies = [a.json() for a in answers]
        assert len({(b["task_id"], b["job_id"]) for b in bodies}) == 1
        assert sum(not b["replayed"] for b in bodies) == 1
    store = replicas[0].store
    assert len(store.jobs.list()) == ROUNDS
    # The replayed requests' images were discarded: one upload folder per task.
    locations = {
        f"{info.key.split('/')[0]}/{info.key.split('/')[1]}/"
        for info in store.objects.list("tasks/")
    }
    assert locations == store.tasks.uploads_locations()
