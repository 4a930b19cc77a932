from __future__ import annotations

import pytest

from dmc_core.config import LearnerConfig


def test_defaults_follow_the_method_description() -> None:
    config = LearnerConfig()
    assert config.method == "dmc_ot" and config.uses_task_tokens and config.uses_calibration
    assert (config.adapter.rank, config.prompts.n_ctx, config.prompts.task_tokens) == (8, 4, 4)
    assert (config.stage1.lr, config.stage1.batch_size) == (1e-3, 64)
    assert (config.stage2.lr, config.stage2.momentum, config.stage2.batch_size) == (2e-3, 0.9, 256)
    assert config.stage2.samples_per_old_class == 256
    assert (config.calibration.method, config.calibration.reg) == ("sinkhorn", 0.05)
    assert config.calibration.samples_per_class == 128 and config.memory.eps == 1e-4
    assert not LearnerConfig(method="dmc").uses_task_tokens


def test_round_trip_and_overrides() -> None:
    config = LearnerConfig().with_overrides({"stage1.epochs": 1, "method": "dmc", "seed": 3})
    assert LearnerConfig.from_dict(config.to_dict()) == config
    assert (config.stage1.epochs, config.method, config.seed) == (1, "dmc", 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stage1": {"epochz": 1}}, "unknown Stage1Config keys"),
        ({"nope": 1}, "unknown LearnerConfig keys"),
        ({"method": "ewc"}, "method must be one of"),
    ],
)
def test_bad_config_is_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearnerConfig.from_dict(data)


def test_bad_override_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'stage3\.epochs'"):
        LearnerConfig().with_overrides({"stage3.epochs": 1})
