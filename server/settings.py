"""The service's settings: the worker's (store, model, jobs) plus the HTTP server's.

`ServerSettings` is the one settings class of the service; every value comes from an
environment variable with the `DMC_` prefix (e.g. `DMC_PORT`, `DMC_AUTH_ENABLED`).
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator

from store.names import MAX_NAME_LENGTH
from worker.settings import WorkerSettings

MIB = 1024 * 1024


class ServerSettings(WorkerSettings):
    # --- HTTP ------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"

    # --- auth ------------------------------------------------------------------------
    # API keys (header X-API-Key) with the scopes `predict` and `admin`. Off only for the
    # embedded demo: turning it off needs DMC_DISPATCHER=embedded.
    auth_enabled: bool = True
    # A key with every scope that needs no database row: the first admin's credential
    # (with it, POST /api-keys makes the other keys). At least 16 characters.
    bootstrap_admin_key: SecretStr | None = None
    # How long a verified key (or a refused one) is remembered before the store is asked
    # again: a revoked key stops working at most this long after.
    api_key_cache_seconds: float = Field(default=10.0, ge=0)
    # Signs the admin dashboard's session cookie. Unset: a random secret per process, so
    # sign-ins end on restart and do not carry across replicas.
    session_secret: SecretStr | None = None

    # --- uploads (POST /classes) and predict input -----------------------------------
    # The whole request body, files included; more is answered with 413.
    max_request_bytes: int = Field(default=100 * MIB, ge=1)
    # What the images of an uploaded archive may add up to once unpacked.
    max_extracted_bytes: int = Field(default=512 * MIB, ge=1)
    # Width x height of one image; checked before the image is decoded (decompression bombs).
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    # Images in one upload (POST /classes).
    max_upload_images: int = Field(default=10_000, ge=1)
    max_class_name_length: int = Field(default=100, ge=1, le=MAX_NAME_LENGTH)
    # Long side / short side of one image (0: any): a 300,000 x 1 image would be scaled
    # up to the model's input on its short side.
    max_image_aspect_ratio: float = Field(default=20.0, ge=0)
    # Width x height of the images of one POST /predict together, checked before decoding.
    max_predict_pixels: int = Field(default=100_000_000, ge=1)
    # Threads that decode predict images: their own, so that handlers waiting on the
    # database never hold up a predict.
    predict_threads: int = Field(default=2, ge=1)
    # Images in one POST /predict request.
    max_predict_images: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=100, ge=1)

    # --- inference batching ----------------------------------------------------------
    # Images of concurrent predict requests go through the model together: a batch closes
    # at `batch_max_size` images or `batch_max_wait_ms` after its first image.
    batch_max_size: int = Field(default=32, ge=1)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    # Images waiting for the model; a request that would go over it gets 503 + Retry-After.
    batch_queue_size: int = Field(default=512, ge=1)
    retry_after_seconds: int = Field(default=1, ge=1)

    # --- model versions --------------------------------------------------------------
    # How often the `active` alias is read (a change made through another replica).
    version_poll_seconds: float = Field(default=2.0, gt=0)
    # A version that failed to load is tried again after this long.
    version_retry_seconds: float = Field(default=60.0, gt=0)
    # Versions kept loaded for requests that pin one (`version=`), besides the active one.
    pinned_versions_cached: int = Field(default=2, ge=0)
    # ... and at most this many bytes of model weights together (None: no byte bound).
    pinned_versions_max_bytes: int | None = Field(default=2 * 1024 * MIB, ge=0)
    # Versions loading at once (each holds about one model's memory while it loads); a
    # request pinning a version waits this long for a free load, then gets 503.
    version_loads_at_once: int = Field(default=1, ge=1)
    version_load_wait_seconds: float = Field(default=5.0, ge=0)
    # Apply the database migrations at start; None: only in the embedded mode.
    migrate_on_start: bool | None = None

    # --- admin dashboard (/admin) ----------------------------------------------------
    # How long a dashboard sign-in lasts.
    session_max_age_seconds: int = Field(default=8 * 3600, ge=60)

    # --- archive uploads -------------------------------------------------------------
    # Entries an uploaded archive may list (folders and skipped files included); a longer
    # listing is refused (413) before it is read whole.
    max_archive_entries: int = Field(default=25_000, ge=1)
    # Bytes of one uploaded image; an archive entry declared (or found) larger is
    # refused (413) before (or while) it is unpacked.
    max_image_bytes: int = Field(default=64 * MIB, ge=1)

    @model_validator(mode="after")
    def _server_checks(self) -> Self:
        if not self.auth_enabled and self.dispatcher != "embedded":
            raise ValueError(
                "DMC_AUTH_ENABLED=false is only for the embedded demo (DMC_DISPATCHER=embedded)"
            )
        key = self.bootstrap_admin_key
        if key is not None and len(key.get_secret_value()) < 16:
            raise ValueError("DMC_BOOTSTRAP_ADMIN_KEY must be at least 16 characters")
        return self

    @property
    def migrate(self) -> bool:
        if self.migrate_on_start is None:
            return self.dispatcher == "embedded"
        return self.migrate_on_start
