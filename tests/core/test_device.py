"""The GPU path's correctness on a CPU (issue 19): the device actually used, bf16
backbones, GPU states on a CPU-only machine, the deterministic mode, and the pixels that
go to the device as uint8."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose, Resize

from dmc_core.backbone import Backbone, BackboneSpec, load_backbone
from dmc_core.device import resolve_device
from dmc_core.learner import Learner
from dmc_core.pixels import split_transform
from dmc_core.prompts import PromptLearner
from dmc_core.state import load_state, save_state, state_tensors
from dmc_core.state_files import MANIFEST
from dmc_core.text import text_tower_for
from tests.core.toy import FAMILIES, colour_images, fast_config

# Short schedules: these tests are about where things run, not what is learned.
QUICK = {"stage1.epochs": 1, "stage2.epochs": 2}


def test_auto_falls_back_to_the_cpu_when_cuda_cannot_start_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA starts here")
    # CUDA reported present (a driver mismatch, say) but it cannot start.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dmc_core.device"):
        assert resolve_device("auto") == "cpu"
    assert "could not start" in caplog.text
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_backbone_learns_and_predicts(
    family: str, checkpoints: dict[str, BackboneSpec]
) -> None:
    backbone = load_backbone(checkpoints[family], precision="bf16")
    learner = Learner(backbone, fast_config("dmc_ot", **QUICK))
    for task, classes in enumerate(([0, 1], [2, 3])):
        images, labels = colour_images(classes, 6, seed=task)
        learner.learn_task(images, labels, [f"colour {k}" for k in classes])
    lora = [p for n, p in learner.backbone.visual.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    predictions = learner.predict(colour_images([0, 3], 2, seed=5)[0], top_k=2)
    assert len(predictions) == 4 and all(len(p.names) == 2 for p in predictions)


def test_a_state_saved_on_a_gpu_loads_on_a_machine_without_one(
    backbone_factory: Callable[[str], Backbone], state_dir: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot", **QUICK))
    images, labels = colour_images([0, 1], 6, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    save_state(learner, state_dir)
    # What a GPU worker writes: its config names the GPU (the tensors are device-free).
    manifest = json.loads((state_dir / MANIFEST).read_text())
    manifest["config"]["device"] = "cuda:0"
    (state_dir / MANIFEST).write_text(json.dumps(manifest))

    restored = load_state(state_dir)
    assert restored.device == torch.device("cpu")
    pixels = learner.preprocess(images)
    assert torch.equal(restored.logits(pixels), learner.logits(pixels))


def _learn(learner: Learner, seen: list[bool]) -> dict[str, torch.Tensor]:
    def progress(stage: str, step: int, total: int) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())

    for task, classes in enumerate(([0, 1], [2, 3])):
        images, labels = colour_images(classes, 6, seed=task)
        learner.learn_task(images, labels, [f"colour {k}" for k in classes], progress=progress)
    return state_tensors(learner)


def test_the_deterministic_mode_holds_while_learning_and_repeats_bit_for_bit(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    config = fast_config("dmc_ot", deterministic=True, **QUICK)
    seen: list[bool] = []
    first = _learn(Learner(backbone_factory("dmc-tiny-vit"), config), seen)
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # put back afterwards
    second = _learn(Learner(backbone_factory("dmc-tiny-vit"), config), [])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    plain: list[bool] = []
    _learn(Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot", **QUICK)), plain)
    assert not any(plain)


def test_loader_workers_give_the_same_state(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    """Preprocessing in worker processes changes nothing but where it runs (no random
    augmentation here: with it, the same number of workers repeats bit for bit)."""
    states = [
        _learn(
            Learner(
                backbone_factory("dmc-tiny-vit"),
                fast_config("dmc_ot", loader_workers=workers, **QUICK, **{"stage1.augment": False}),
            ),
            [],
        )
        for workers in (0, 2)
    ]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_uint8_pixels_normalised_later_are_the_transforms_bits(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    images, _ = colour_images([0, 4], 3, seed=1)
    images.append(Image.new("L", (40, 20), 128))  # grey, not square
    for transform in (backbone.preprocess_val, backbone.preprocess_train):
        cut = split_transform(transform)
        assert cut.mean is not None
        torch.manual_seed(3)
        expected = torch.stack([transform(image) for image in images])
        torch.manual_seed(3)
        uint8 = torch.stack([cut.to_uint8(image) for image in images])
        assert uint8.dtype == torch.uint8
        assert torch.equal(cut.finish(uint8), expected)
    # A transform that does not end in ToTensor + Normalize is used whole.
    whole = split_transform(Compose([Resize(8)]))
    assert whole.mean is None and whole.finish(torch.ones(2, 3)).equal(torch.ones(2, 3))


def test_task_tokens_per_class_follow_each_classs_task(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    prompts = PromptLearner(
        text_tower_for(backbone.model, backbone.tokenizer), fast_config().prompts, 4
    )
    prompts.restore_classes(["a", "b", "c", "d", "e"], [0, 0, 1, 0, 2])
    with torch.no_grad():
        for task, tokens in enumerate(prompts.task_tokens):
            tokens.fill_(float(task))
    rows = prompts._task_tokens_per_class()
    assert rows.shape == (5, 4, prompts.width)
    assert rows[:, 0, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 2.0]


def test_predict_takes_uint8_pixels_and_answers_as_with_the_float_transform(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot"))
    learner.prompts.restore_classes(["red", "blue", "green"], [0, 0, 1])
    images, _ = colour_images([0, 2, 4], 2, seed=4)
    pixels = learner.preprocess(images)
    assert pixels.dtype == torch.uint8  # a quarter of float32's bytes to the device
    floats = torch.stack([learner.backbone.preprocess_val(image) for image in images])
    assert torch.equal(learner.logits(pixels), learner.logits(floats))
