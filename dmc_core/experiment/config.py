"""An experiment as one YAML file: dataset, backbone, protocol, seeds, methods, learner
settings and evaluation. Unknown keys are refused; `--set key=value` edits it by dotted key.

```yaml
name: cifar100_b0_inc10
dataset: {name: cifar100, options: {root: data}, train_per_class: null, test_per_class: null}
backbone: {name: ViT-B-16, pretrained: openai}
protocol: B0-Inc10
seeds: [1993]                 # one run per seed: class order, learner seed, train subsample
class_order: null             # null: permutation by each run's seed; an int: that seed; a list
methods: [zeroshot, finetune, dmc, dmc_ot, joint]
learner: {stage1: {epochs: 3}}          # LearnerConfig fields (nested or dotted keys)
method_overrides: {joint: {stage1.epochs: 3}}
evaluation: {split: test, batch_size: 128, feature_cache: ~/.cache/dmc/features}
```
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dmc_core.backbone import DEFAULT_CACHE_DIR, BackboneSpec
from dmc_core.config import LearnerConfig
from dmc_core.errors import DmcError

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "ExperimentError",
    "apply_sets",
    "flatten",
    "load_experiment_config",
]

ALL_METHODS = ["zeroshot", "finetune", "dmc", "dmc_ot", "joint"]


class ExperimentError(DmcError, ValueError):
    """An experiment that cannot run as configured; the message says what to fix."""


@dataclass
class BackboneConfig:
    name: str = "ViT-B-16"
    pretrained: str | None = "openai"
    checkpoint: str | None = None
    image_size: int | None = None
    # Where locally built models (the stand-in) are cached; None: ~/.cache/dmc.
    cache_dir: str | None = None
    # Store the image tower's weights channels-last: ~1.5-2x faster convolutions on CPU
    # (CNN towers such as the stand-in's); results stay deterministic.
    channels_last: bool = False

    def spec(self) -> BackboneSpec:
        return BackboneSpec(self.name, self.pretrained, self.checkpoint, self.image_size)

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else DEFAULT_CACHE_DIR


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    # Keyword options of the dataset loader (root, invert, split_seed, ...).
    options: dict[str, Any] = field(default_factory=dict)
    # Images per class drawn from the train split with each run's seed (None: all).
    train_per_class: int | None = None
    # Test images per class (None: all), drawn with `subset_seed`, the same for every run.
    test_per_class: int | None = None
    # Images per class held out of train (with `subset_seed`) as a validation split, for
    # tuning without touching the test split; evaluate on it with evaluation.split=validation.
    validation_per_class: int = 0
    subset_seed: int = 0


@dataclass
class EvaluationConfig:
    split: Literal["test", "validation"] = "test"
    batch_size: int = 128
    # Disk cache of image features of frozen encoders; None keeps them in memory only.
    feature_cache: str | None = str(DEFAULT_CACHE_DIR / "features")
    # Methods whose memory gets the calibration diagnostic after every task (METHOD.md).
    diagnostics: list[str] = field(default_factory=lambda: ["dmc_ot"])


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    dataset: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    protocol: str = "B0-Inc10"
    seeds: list[int] = field(default_factory=lambda: [1993])
    class_order: int | list[int] | None = None
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    # LearnerConfig fields for every method (nested dicts or dotted keys); `seed` is set
    # by each run's seed and may not appear here.
    learner: dict[str, Any] = field(default_factory=dict)
    # Extra LearnerConfig fields per method, applied after the method's own settings.
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # Stop after this many tasks (quick looks); None runs the whole protocol.
    max_tasks: int | None = None
    # Keep each run's last learner state after it finishes (otherwise only until then).
    keep_states: bool = False
    # torch intra-op threads for the run; None leaves torch's default. On a CPU shared
    # with other jobs, 1 thread is often several times faster than 2 (no spin-waiting).
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        config = _build(cls, data, "")
        config.validate()
        return config

    def validate(self) -> None:
        from dmc_core.experiment.methods import get_method_class, list_methods
        from dmc_core.experiment.protocol import Protocol

        try:
            Protocol.parse(self.protocol)
        except ValueError as error:
            raise ExperimentError(str(error)) from error
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ExperimentError(f"seeds must be a non-empty list without repeats: {self.seeds}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ExperimentError(
                f"methods must be a non-empty list without repeats: {self.methods}"
            )
        known = list_methods()
        for name in [*self.methods, *self.method_overrides]:
            if name not in known:
                raise ExperimentError(f"unknown method {name!r}; known: {', '.join(known)}")
        for name in self.evaluation.diagnostics:
            if name not in known:
                raise ExperimentError(f"unknown method {name!r} in evaluation.diagnostics")
            if not get_method_class(name).has_memory:
                raise ExperimentError(
                    f"evaluation.diagnostics: {name!r} keeps no Gaussian memory across tasks"
                )
        if "seed" in flatten(self.learner):
            raise ExperimentError("learner.seed is set by each run's seed: use `seeds` instead")
        for size_key in ("train_per_class", "test_per_class"):
            value = getattr(self.dataset, size_key)
            if value is not None and value < 1:
                raise ExperimentError(f"dataset.{size_key} must be at least 1 or null")
        if self.dataset.validation_per_class < 0:
            raise ExperimentError("dataset.validation_per_class must be >= 0")
        if self.evaluation.split == "validation" and self.dataset.validation_per_class < 1:
            raise ExperimentError(
                "evaluation.split=validation needs dataset.validation_per_class >= 1"
            )
        if self.evaluation.batch_size < 1:
            raise ExperimentError("evaluation.batch_size must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ExperimentError("threads must be at least 1 or null")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ExperimentError("max_tasks must be at least 1 or null")
        for name in self.methods:
            self.learner_config(name, self.seeds[0])  # refuses unknown learner keys early

    def base_learner_config(self) -> LearnerConfig:
        try:
            return LearnerConfig().with_overrides(flatten(self.learner))
        except (ValueError, TypeError) as error:
            raise ExperimentError(f"learner: {error}") from error

    def learner_config(self, method: str, seed: int) -> LearnerConfig:
        """The learner settings of one method in the run of one seed."""
        from dmc_core.experiment.methods import get_method_class

        config = get_method_class(method).learner_config(self.base_learner_config())
        overrides = flatten(self.method_overrides.get(method, {}))
        try:
            return config.with_overrides({**overrides, "seed": seed})
        except (ValueError, TypeError) as error:
            raise ExperimentError(f"method_overrides.{method}: {error}") from error


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"stage1": {"epochs": 1}} -> {"stage1.epochs": 1} (dotted keys pass through)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` edits (values parsed as YAML) to a config dict, in order."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(text) if text.strip() else None
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ExperimentError(f"--set {key}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return out


def load_experiment_config(path: Path, sets: list[str] | None = None) -> ExperimentConfig:
    if not path.is_file():
        raise ExperimentError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ExperimentError(f"{path} must hold a mapping of settings")
    return ExperimentConfig.from_dict(apply_sets(data, sets or []))


# ------------------------------------------------------------------ strict loading
T = TypeVar("T")


def _build(cls: type[T], data: Any, path: str) -> T:
    where = path or "config"
    if not isinstance(data, dict):
        raise ExperimentError(f"{where} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ExperimentError(f"unknown key(s) {unknown} in {where}; known: {names}")
    kwargs = {name: _coerce(hints[name], value, f"{path}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, f"{path}.")
    if _matches(hint, value):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ExperimentError(f"{path} must be {_describe(hint)}, got {value!r}")


def _matches(hint: Any, value: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(arg, value) for arg in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__
