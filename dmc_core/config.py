"""Every design choice of METHOD.md as one configuration, with the defaults given there."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_type_hints

from dmc_core.class_scores import SCORE_KINDS, ScoreKind
from dmc_core.memory import MemoryConfig

DmcVariant = Literal["dmc", "dmc_ot"]
DMC_VARIANTS: tuple[DmcVariant, ...] = ("dmc", "dmc_ot")


@dataclass
class AdapterConfig:
    """Stage 1's trainable part of the image tower."""

    mode: Literal["lora", "full"] = "lora"
    rank: int = 8
    alpha: float = 8.0
    # Module names inside the image tower; None picks them by tower type (adapters.py).
    target_modules: list[str] | None = None
    # CNN trunks: how many of the last blocks get LoRA on their linear / 1x1-conv layers.
    last_blocks: int = 2


@dataclass
class PromptConfig:
    # M shared context tokens. `ctx_init` initialises them from a phrase of at most M
    # tokens (it fills the last slots, next to the class name; the rest start random,
    # std 0.02); None starts them all random.
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    # L learnable tokens per task (DMC-OT only); class c uses the tokens of its task.
    task_tokens: int = 4
    # Hand-written prompt: stage-1 anchors when `Stage1Config.anchors == "template"`.
    template: str = "a photo of a {}."
    # Older tasks' tokens stay frozen (METHOD.md); True retrains them on replay in stage 2.
    train_old_task_tokens: bool = False


@dataclass
class Stage1Config:
    """Vision adaptation with the text side frozen."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    anchors: Literal["prompts", "template"] = "prompts"
    loss_classes: Literal["task", "seen"] = "task"
    augment: bool = True


@dataclass
class Stage2Config:
    """Prompt learning with the vision side frozen.

    Every epoch trains on all real features of the new classes (once each) and on Gaussian
    samples of the old classes; each step runs the text tower over every seen class's
    prompt (the softmax is over all seen classes). `replay` says how many samples each old
    class gets per epoch, and how the epoch is cut into steps:

    - "per_class": METHOD.md's schedule, N_s = `samples_per_old_class` per old class, all
      shuffled into one pool cut into batches of `batch_size`. Its steps per epoch grow
      with the old classes and each step with all classes: one task costs O(classes^2).
    - "bounded" (default): per old class as many samples as a new class has images on
      average (at most N_s), so real and replayed classes weigh the same; but in all at
      most `replay_ratio` x the new task's images, spread evenly over the old classes (a
      fresh random choice each epoch of those that get one more). The steps per epoch are
      ceil(new images / batch_size), as for a first task, whatever the number of old
      classes; each step's batch holds its share of the new images and of the replay (so
      up to (1 + replay_ratio) x batch_size samples). One task costs O(classes).
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    # N_s Gaussian samples per old class per epoch; 0 trains on new data only (no replay).
    samples_per_old_class: int = 256
    replay: Literal["per_class", "bounded"] = "bounded"
    # "bounded": replay samples per epoch at most this many times the new task's images.
    replay_ratio: float = 4.0


@dataclass
class CalibrationConfig:
    """DMC-OT's optimal-transport calibration of the old classes' statistics."""

    method: str = "sinkhorn"
    samples_per_class: int = 128
    reg: float = 0.05
    # Working memory of the calibration, whatever the number of classes and images: the
    # sample-level plan is solved in blocks of classes, recomputed when it does not fit.
    memory_budget_mib: float = 256.0
    # How "sinkhorn" moves covariances: "linear_map" (a ridge fit of the moves, A^T cov A),
    # "sample_difference" (METHOD.md; degrades the covariances, see calibration.py) or
    # "none" (means only).
    covariance_update: str = "linear_map"


@dataclass
class InferenceConfig:
    """How a prediction scores classes: the text prototypes, optionally fused with the
    Gaussian memory (logits = text logits + memory_weight * memory scores)."""

    # 0 scores with the text prototypes only (METHOD.md); choose a weight on validation.
    memory_weight: float = 0.0
    # "cosine": s * cos(f(x), class mean); "mahalanobis": -d^2/2 with the class covariance;
    # "fecam": FeCAM's score from the memory (dmc_core.class_scores, alphas from `memory`).
    memory_score: ScoreKind = "cosine"


@dataclass
class LearnerConfig:
    method: DmcVariant = "dmc_ot"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # s in s * cos(f(x), w_c); None uses the backbone's own (frozen) logit scale.
    logit_scale: float | None = None
    min_images_per_class: int = 2
    seed: int = 0
    device: str = "cpu"
    # "bf16" autocasts the forward passes on CUDA; weights stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    feature_batch_size: int = 128
    # DataLoader worker processes that preprocess images; None: none on a CPU, up to 8
    # on a GPU (dmc_core.pixels.loader_workers).
    loader_workers: int | None = None
    # Deterministic algorithms and math attention while learning (dmc_core.device): the
    # same seed gives bit-identical states on a GPU too, at some speed (README).
    deterministic: bool = False

    @property
    def uses_task_tokens(self) -> bool:
        return self.method == "dmc_ot" and self.prompts.task_tokens > 0

    @property
    def uses_calibration(self) -> bool:
        return self.method == "dmc_ot" and self.calibration.method != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnerConfig:
        return _from_dict(cls, data)

    def with_overrides(self, overrides: dict[str, Any]) -> LearnerConfig:
        """Apply dotted-key overrides such as {"stage1.epochs": 1}."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ValueError(f"unknown config key {dotted!r}")
                node = node[key]
            if leaf not in node:
                raise ValueError(f"unknown config key {dotted!r}")
            node[leaf] = value
        return LearnerConfig.from_dict(data)


T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a dict, refusing keys it does not know."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = _from_dict(hint, value)  # type: ignore[arg-type]
        else:
            kwargs[name] = value
    config = cls(**kwargs)
    if isinstance(config, LearnerConfig) and config.method not in DMC_VARIANTS:
        raise ValueError(f"method must be one of {DMC_VARIANTS}, got {config.method!r}")
    if isinstance(config, InferenceConfig):
        if config.memory_weight < 0:
            raise ValueError(f"inference.memory_weight must be >= 0, got {config.memory_weight}")
        if config.memory_score not in SCORE_KINDS:
            raise ValueError(
                f"inference.memory_score must be one of {SCORE_KINDS}, got {config.memory_score!r}"
            )
    return config
