"""API keys are stored hashed and verified to their scopes."""

from __future__ import annotations

from sqlalchemy import select

from store.api_keys import ApiKeys, hash_key
from store.db import Database
from store.models import ApiKey


def test_create_verify_revoke(db: Database) -> None:
    keys = ApiKeys(db)
    info, plaintext = keys.create("ci", ["predict", "admin", "predict"])
    assert plaintext.startswith("dmc_") and len(plaintext) > 40
    assert info.scopes == frozenset({"predict", "admin"})

    with db.read() as session:
        stored = session.scalars(select(ApiKey.key_hash)).all()
    assert stored == [hash_key(plaintext)]
    assert plaintext not in stored

    assert keys.verify(plaintext) == frozenset({"predict", "admin"})
    assert keys.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert keys.verify("") is None
    assert keys.verify(None) is None
    assert keys.verify("not-a-key") is None

    other, other_plain = keys.create("reader", [])
    assert keys.verify(other_plain) == frozenset()
    assert [k.id for k in keys.list()] == [info.id, other.id]

    assert keys.revoke(info.id)
    assert not keys.revoke(info.id)
    assert keys.verify(plaintext) is None
    assert keys.verify(other_plain) == frozenset()
