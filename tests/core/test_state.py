from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dmc_core.backbone import Backbone, BackboneSpec, load_backbone, weights_digest
from dmc_core.files import sha256_file
from dmc_core.learner import Learner, TaskError
from dmc_core.state import StateError, load_state, save_state, state_tensors
from dmc_core.state_files import (
    INFERENCE_FILE,
    LEGACY_TENSORS,
    MANIFEST,
    files_of_part,
    memory_file,
)
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
    stored = sorted(p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*.*"))
    assert stored == sorted([MANIFEST, INFERENCE_FILE, memory_file(0), memory_file(1)])

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


@pytest.mark.parametrize("name", [INFERENCE_FILE, memory_file(0)])
def test_corrupt_tensor_file_is_refused(saved: Path, name: str) -> None:
    data = bytearray((saved / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / name).write_bytes(bytes(data))
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
    with pytest.raises(StateError, match="format 99; this dmc reads formats 1 and 2"):
        load_state(saved)


def test_missing_files_are_refused(saved: Path, tmp_path: Path) -> None:
    (saved / memory_file(0)).unlink()
    with pytest.raises(StateError, match=r"memory/task-00000\.safetensors is missing"):
        load_state(saved)
    (saved / INFERENCE_FILE).unlink()
    with pytest.raises(StateError, match=r"inference\.safetensors is missing"):
        load_state(saved, part="inference")
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


# --- the inference part ----------------------------------------------------------------


def test_inference_part_predicts_without_the_memory_and_refuses_to_learn(
    backbone_factory: Callable[[str], Backbone], state_dir: Path
) -> None:
    learner = _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot")))
    manifest = save_state(learner, state_dir)
    training = [n for n, f in manifest["files"].items() if f["part"] == "training"]
    assert training == [memory_file(0), memory_file(1)]
    assert files_of_part(manifest, "inference") == [MANIFEST, INFERENCE_FILE]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(state_dir / name)
        assert entry["size"] == (state_dir / name).stat().st_size
    for name in training:
        (state_dir / name).unlink()  # a replica never reads them

    replica = load_state(state_dir, part="inference")
    assert replica.inference_only and len(replica.memory) == 0
    pixels = learner.preprocess(colour_images([0, 1, 2, 3], 3, seed=7)[0])
    assert torch.equal(replica.logits(pixels), learner.logits(pixels))

    # The cached prototypes are what the replica answers with: the text tower never runs.
    def no_text_tower() -> torch.Tensor:
        raise AssertionError("the text tower ran")

    replica.prompts.forward = no_text_tower  # type: ignore[method-assign]
    assert replica.predict(pixels, top_k=1)[0].names == learner.predict(pixels, top_k=1)[0].names

    images, labels = colour_images([4], 6, seed=3)
    with pytest.raises(TaskError, match="inference only"):
        replica.learn_task(images, labels, ["colour 4"])
    with pytest.raises(StateError, match="inference only"):
        save_state(replica, state_dir / "again")
    with pytest.raises(StateError, match=r"memory/task-00000\.safetensors is missing"):
        load_state(state_dir, part="full")


def test_memory_fused_inference_puts_the_memory_in_the_inference_part(
    backbone_factory: Callable[[str], Backbone], state_dir: Path
) -> None:
    config = fast_config("dmc_ot").with_overrides({"inference.memory_weight": 2.0})
    learner = _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), config))
    manifest = save_state(learner, state_dir)
    assert files_of_part(manifest, "inference") == [
        MANIFEST,
        INFERENCE_FILE,
        memory_file(0),
        memory_file(1),
    ]

    replica = load_state(state_dir, part="inference")
    assert replica.inference_only and replica.memory.class_indices == [0, 1, 2, 3]
    pixels = learner.preprocess(colour_images([0, 1, 2, 3], 3, seed=7)[0])
    assert torch.equal(replica.logits(pixels), learner.logits(pixels))


def test_unchanged_statistics_keep_identical_files(
    backbone_factory: Callable[[str], Backbone], tmp_path: Path
) -> None:
    # DMC without calibration leaves the old classes' statistics alone, so the memory
    # files of old tasks are byte-identical from one state to the next.
    learner = _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc")))
    before = save_state(learner, tmp_path / "two")
    images, labels = colour_images([4], 6, seed=3)
    learner.learn_task(images, labels, ["colour 4"])
    after = save_state(learner, tmp_path / "three")
    for name in (memory_file(0), memory_file(1)):
        assert after["files"][name] == before["files"][name]
    assert set(after["files"]) - set(before["files"]) == {memory_file(2)}
    assert after["files"][INFERENCE_FILE] != before["files"][INFERENCE_FILE]

    restored = load_state(tmp_path / "three")
    for key, value in state_tensors(learner).items():
        assert torch.equal(value, state_tensors(restored)[key]), key

    # Saved over a state with more tasks, the folder keeps only what the manifest lists.
    save_state(load_state(tmp_path / "two"), tmp_path / "three")
    assert not (tmp_path / "three" / memory_file(2)).exists()


def test_memory_files_that_do_not_match_the_tasks_are_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["classes"][1]["task"] = 1  # two tasks claimed, one memory file
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="do not match its tasks"):
        load_state(saved)


def _save_format_1(learner: Learner, folder: Path) -> None:
    """What the format-1 writer (one tensor file, no prototypes) produced."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(state_tensors(learner), str(folder / LEGACY_TENSORS))
    manifest = {
        "format_version": 1,
        "backbone": learner.backbone.spec.to_dict(),
        "backbone_id": learner.backbone.spec.id,
        "config": learner.config.to_dict(),
        "classes": [{"name": c.name, "task": c.task} for c in learner.classes],
        "n_tasks": learner.n_tasks,
        "tensors_sha256": sha256_file(folder / LEGACY_TENSORS),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_format_1_states_still_load(
    backbone_factory: Callable[[str], Backbone], tmp_path: Path
) -> None:
    learner = _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot")))
    _save_format_1(learner, tmp_path / "v1")
    assert files_of_part(json.loads((tmp_path / "v1" / MANIFEST).read_text()), "inference") == [
        MANIFEST,
        LEGACY_TENSORS,
    ]
    pixels = learner.preprocess(colour_images([0, 3], 3, seed=2)[0])
    full = load_state(tmp_path / "v1")
    for key, value in state_tensors(learner).items():
        assert torch.equal(value, state_tensors(full)[key]), key
    assert torch.equal(full.logits(pixels), learner.logits(pixels))
    replica = load_state(tmp_path / "v1", part="inference")
    assert replica.inference_only and len(replica.memory) == 0
    assert torch.equal(replica.logits(pixels), learner.logits(pixels))
    # Saved again, it is a format-2 state.
    assert save_state(full, tmp_path / "v2")["format_version"] == 2


def test_a_backbone_with_other_weights_under_the_same_name_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 14 (9): a random-weights backbone (no pretrained tag, no checkpoint) built
    twice with different seeds has the same id but other weights: refused, whether it is
    rebuilt from the manifest or given."""
    torch.manual_seed(1)
    learner = _learn_two_tasks(Learner(load_backbone("dmc-tiny-vit"), fast_config()))
    manifest = save_state(learner, tmp_path / "s")
    assert manifest["backbone_digest"] == learner.backbone.weights_digest
    torch.manual_seed(2)
    with pytest.raises(StateError, match=r"different weights.*at random"):
        load_state(tmp_path / "s")
    torch.manual_seed(3)
    with pytest.raises(StateError, match="different weights"):
        load_state(tmp_path / "s", load_backbone("dmc-tiny-vit"), part="inference")
    # The same seed: the same weights, and the digest proves it.
    torch.manual_seed(1)
    assert load_state(tmp_path / "s").class_names == learner.class_names


def test_a_random_backbone_without_a_digest_cannot_be_proven_identical(
    tmp_path: Path, backbone_factory: Callable[[str], Backbone]
) -> None:
    torch.manual_seed(1)
    save_state(
        _learn_two_tasks(Learner(load_backbone("dmc-tiny-vit"), fast_config())), tmp_path / "r"
    )
    save_state(
        _learn_two_tasks(Learner(backbone_factory("dmc-tiny-vit"), fast_config())), tmp_path / "c"
    )
    for name in ("r", "c"):  # a state saved before the digest existed
        path = tmp_path / name / MANIFEST
        manifest = json.loads(path.read_text())
        del manifest["backbone_digest"]
        path.write_text(json.dumps(manifest))
    torch.manual_seed(1)
    with pytest.raises(StateError, match="cannot be proven identical"):
        load_state(tmp_path / "r")
    assert load_state(tmp_path / "c").n_tasks == 2  # a checkpoint names its weights


def test_the_weights_digest_is_stable_and_sees_one_changed_weight() -> None:
    torch.manual_seed(0)
    first = load_backbone("dmc-tiny-vit")
    torch.manual_seed(0)
    again = load_backbone("dmc-tiny-vit")
    assert first.weights_digest == again.weights_digest == weights_digest(first.model)
    with torch.no_grad():
        next(again.model.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(again.model) != first.weights_digest
