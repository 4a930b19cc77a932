"""The store's part of the settings (environment variables with the `DMC_` prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DMC_", extra="ignore")

    database_url: str = "sqlite:///runs/service/dmc.sqlite"
    database_echo: bool = False
    # Every database call is bounded: opening a connection, one statement (PostgreSQL:
    # statement_timeout, which also bounds lock waits; SQLite: how long a write waits for
    # the lock), and waiting for a free pooled connection. Over them the API answers 503.
    database_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0)
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0)

    object_store: Literal["local", "s3"] = "local"
    objects_dir: Path = Path("runs/service/objects")

    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Unset: boto3's usual credential chain (instance role, ~/.aws, ...).
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # Seconds to connect to the object store and to wait for a response, per attempt.
    s3_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    s3_read_timeout_seconds: float = Field(default=30.0, gt=0)

    keep_uploads: bool = False
    # Blobs without a row younger than this are left alone by the garbage collector: they
    # may belong to a publish or an upload that has not committed yet.
    gc_grace_seconds: float = Field(default=3600.0, ge=0)

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Self:
        if self.object_store == "s3" and not self.s3_bucket:
            raise ValueError("DMC_S3_BUCKET is required when DMC_OBJECT_STORE=s3")
        return self
