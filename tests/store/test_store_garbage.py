"""The ledger of the scheduled garbage collection: counts per kind, and one collector of
the object store per interval across processes."""

from __future__ import annotations

import threading

from store.db import Database
from store.garbage import OBJECTS, SCRATCH_FOLDERS, GarbageLedger


def test_counts_add_up_per_kind(db: Database) -> None:
    ledger = GarbageLedger(db)
    assert ledger.totals() == []
    ledger.add(OBJECTS, 3)
    ledger.add(OBJECTS, 2)
    ledger.add(SCRATCH_FOLDERS, 0)
    rows = {row.kind: row for row in ledger.totals()}
    assert {kind: row.total for kind, row in rows.items()} == {OBJECTS: 5, SCRATCH_FOLDERS: 0}
    assert all(row.last_run_at is not None for row in rows.values())


def test_one_claim_per_interval_among_concurrent_processes(database_url: str) -> None:
    clients = 6
    barrier = threading.Barrier(clients)
    claims: list[bool] = []

    def claim() -> None:
        db = Database.from_url(database_url)
        try:
            barrier.wait(timeout=10)
            claims.append(GarbageLedger(db).claim(OBJECTS, 3600))
        finally:
            db.dispose()

    threads = [threading.Thread(target=claim) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claims) == [False] * (clients - 1) + [True]
    db = Database.from_url(database_url)
    try:
        assert GarbageLedger(db).claim(OBJECTS, 0)  # the interval is over
    finally:
        db.dispose()
