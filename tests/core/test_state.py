from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dmc_core.backbone import Backbone, BackboneSpec
from dmc_core.learner import Learner
from dmc_core.state import MANIFEST, TENSORS, StateError, load_state, save_state, state_tensors
from tests.core.toy import FAMILIES, colour_images, fast_config


def _learn_two_tasks(learner: Learner) -> Learner:
    for task, classes in enumerate(([0, 1], [2, 3])):
        images, labels = colour_images(classes, 8, seed=task)
        learner.learn_task(images, labels, [f"colour {k}" for k in classes])
    return learner


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_bit_identical_predictions(
    family: str,
    backbone_factory: Callable[[str], Backbone],
    checkpoints: dict[str, BackboneSpec],
    state_dir: Path,
) -> None:
    learner = _learn_two_tasks(Learner(backbone_factory(family), fast_config("dmc_ot")))
    manifest = save_state(learner, state_dir)
    assert manifest["classes"][-1] == {"name": "colour 3", "task": 1}
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([MANIFEST, TENSORS])

    restored = load_state(state_dir)  # backbone rebuilt from the manifest's spec
    assert restored.backbone.spec == checkpoints[family]
    images, _ = colour_images([0, 1, 2, 3], 3, seed=7)
    pixels = learner.preprocess(images)
    assert torch.equal(learner.logits(pixels), restored.logits(pixels))
    assert [c.name for c in restored.classes] == [c.name for c in learner.classes]
    for key, value in state_tensors(learner).items():
        assert torch.equal(value, state_tensors(restored)[key]), key

    # A restored learner keeps learning.
    images, labels = colour_images([4], 6, seed=3)
    restored.learn_task(images, labels, ["colour 4"])
    assert restored.n_tasks == 3


def test_merged_learner_predicts_the_same(
    backbone_factory: Callable[[str], Backbone], state_dir: Path
) -> None:
    learner = _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot")))
    save_state(learner, state_dir)
    pixels = learner.preprocess(colour_images([0, 3], 4, seed=1)[0])
    before = learner.logits(pixels)
    learner.merge_for_inference()
    torch.testing.assert_close(learner.logits(pixels), before, atol=1e-4, rtol=1e-5)
    with pytest.raises(StateError, match="merged"):
        save_state(learner, state_dir)


@pytest.fixture
def saved(backbone_factory: Callable[[str], Backbone], state_dir: Path) -> Path:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc"))
    images, labels = colour_images([0, 1], 6, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    save_state(learner, state_dir)
    return state_dir


def test_corrupt_tensor_file_is_refused(saved: Path) -> None:
    data = bytearray((saved / TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / TENSORS).write_bytes(bytes(data))
    with pytest.raises(StateError, match="corrupt"):
        load_state(saved)


def test_unreadable_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST).write_text('{"format_version": 1, ')
    with pytest.raises(StateError, match="not valid JSON"):
        load_state(saved)


def test_other_format_version_is_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="format 99"):
        load_state(saved)


def test_missing_files_are_refused(saved: Path, tmp_path: Path) -> None:
    (saved / TENSORS).unlink()
    with pytest.raises(StateError, match=r"state\.safetensors is missing"):
        load_state(saved)
    with pytest.raises(StateError, match=r"manifest\.json is missing"):
        load_state(tmp_path / "nowhere")


def test_state_of_another_backbone_is_refused(
    saved: Path, backbone_factory: Callable[[str], Backbone]
) -> None:
    with pytest.raises(StateError, match="saved on backbone"):
        load_state(saved, backbone_factory("dmc-tiny-cnn-bert"))


def test_tensors_that_do_not_fit_are_refused(saved: Path) -> None:
    # Same tensors, but a manifest claiming another architecture of the same name family.
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["backbone"]["name"] = "dmc-tiny-cnn-bert"
    manifest["backbone_id"] = "dmc-tiny-cnn-bert@" + manifest["backbone_id"].split("@")[1]
    manifest["backbone"]["checkpoint"] = None
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="does not fit"):
        load_state(saved)
