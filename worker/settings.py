"""The worker's settings: the store's plus the model and the job dispatch (env, `DMC_` prefix).

The server subclasses this class; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from store.settings import StoreSettings

# Learner keys that have their own setting (they are not learner_overrides).
_OWN_SETTINGS = {
    "device": "DMC_DEVICE",
    "precision": "DMC_PRECISION",
    "deterministic": "DMC_DETERMINISTIC",
    "min_images_per_class": "DMC_MIN_IMAGES_PER_CLASS",
}


class WorkerSettings(StoreSettings):
    # --- the model -------------------------------------------------------------------
    # The base model of the first version (later versions keep the backbone their state
    # was saved on): an open_clip name with a pretrained tag or a checkpoint file.
    backbone_name: str = "ViT-B-16"
    backbone_pretrained: str | None = "openai"
    backbone_checkpoint: str | None = None
    backbone_image_size: int | None = Field(default=None, gt=0)
    # Where open_clip / Hugging Face files and locally built models are cached; None:
    # dmc_core's default (~/.cache/dmc).
    model_cache_dir: Path | None = None
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # Server and worker alike: "bf16" autocasts the forward passes on a GPU.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Bit-identical updates on a GPU too (deterministic algorithms, math attention), at
    # some speed (README).
    deterministic: bool = False
    # Dotted LearnerConfig keys, as JSON: DMC_LEARNER_OVERRIDES='{"stage1.epochs": 5}'.
    # All of them shape the base learner; for later tasks only the schedule keys
    # (stage1.*, stage2.*, calibration.*, feature_batch_size, loader_workers) apply, the
    # others are fixed by the saved state.
    learner_overrides: dict[str, Any] = Field(default_factory=dict)
    min_images_per_class: int = Field(default=2, ge=1)
    # Uploaded images are shrunk to at most this many pixels a side when decoded (the
    # model sees 224 or so; this bounds the job's memory). 0 keeps them as uploaded.
    max_image_side: int = Field(default=512, ge=0)
    # Scratch space for the states a job loads and writes; None: the system's temp dir.
    work_dir: Path | None = None

    # --- jobs ------------------------------------------------------------------------
    dispatcher: Literal["embedded", "celery"] = "embedded"
    broker_url: str = "redis://127.0.0.1:6379/0"
    celery_queue: str = Field(default="dmc-updates", min_length=1)
    # Redis redelivers a message not acknowledged within this time. Messages are
    # acknowledged when a job starts (late acks are off), so this only bounds the
    # redelivery of wake-up messages a worker had prefetched when it died.
    celery_visibility_timeout: float = Field(default=12 * 3600.0, gt=0)
    # A running job's heartbeat extends its lease by this much (every quarter of it); a
    # job whose lease has expired while no worker holds the update lock is run again.
    job_lease_seconds: float = Field(default=60.0, gt=0)
    # How often an idle worker looks for jobs that nobody announced (a lost message, a
    # dead worker's job).
    job_sweep_seconds: float = Field(default=30.0, gt=0)
    # Progress (and the cancel check that comes with it) is written at most this often.
    job_progress_interval_seconds: float = Field(default=1.0, ge=0)
    # A job whose runner died this many times is failed instead of run again.
    job_max_attempts: int = Field(default=3, ge=1)
    # How often the workers collect what crashes leave (unreferenced objects older than
    # DMC_GC_GRACE_SECONDS, `dmc-job-*` scratch folders of dead runs); 0: never.
    gc_interval_seconds: float = Field(default=600.0, ge=0)

    # --- the promotion gate -------------------------------------------------------------
    # A learned version becomes active only if, on the evaluation sets, its accuracy on
    # the old classes is at most this many points below its parent's on the same images
    # (DMC_GATE_MAX_OLD_DROP) and on its new classes at least this many percent
    # (DMC_GATE_MIN_NEW_ACCURACY). Unset: not checked. An upload can override both.
    gate_max_old_drop: float | None = Field(default=None, ge=0, le=100)
    gate_min_new_accuracy: float | None = Field(default=None, ge=0, le=100)

    @field_validator("learner_overrides")
    @classmethod
    def _known_learner_keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        own = sorted(set(overrides) & set(_OWN_SETTINGS))
        if own:
            listed = ", ".join(f"{k} ({_OWN_SETTINGS[k]})" for k in own)
            raise ValueError(f"set these with their own settings, not learner_overrides: {listed}")
        # Imported here: dmc_core pulls in torch, which `dmc worker --help` does not need.
        from dmc_core.config import LearnerConfig

        LearnerConfig().with_overrides(overrides)  # raises on an unknown key
        return overrides

    @model_validator(mode="after")
    def _backbone_weights(self) -> Self:
        if not self.backbone_name.strip():
            raise ValueError("DMC_BACKBONE_NAME must not be empty")
        return self
