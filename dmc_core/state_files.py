"""Which files of a saved state each part needs, read from its manifest alone.

Kept apart from `dmc_core.state` (and free of torch) so that the store can fetch one part
of a version without importing the learner.
"""

from __future__ import annotations

from typing import Any, Literal

Part = Literal["inference", "full"]
PARTS: tuple[Part, ...] = ("inference", "full")

MANIFEST = "manifest.json"
INFERENCE_FILE = "inference.safetensors"
MEMORY_DIR = "memory"
LEGACY_TENSORS = "state.safetensors"  # format 1: one file holding everything

# The part a file belongs to, as recorded in the manifest: "inference" (what prediction
# needs) or "training" (what only learning needs). A full load reads both.
INFERENCE = "inference"
TRAINING = "training"


def memory_file(task: int) -> str:
    return f"{MEMORY_DIR}/task-{task:05d}.safetensors"


def files_of_part(manifest: dict[str, Any], part: Part) -> list[str]:
    """The state files (manifest first) that loading `part` reads."""
    if part not in PARTS:
        raise ValueError(f"unknown state part {part!r}; one of {', '.join(PARTS)}")
    files = manifest.get("files")
    if not isinstance(files, dict):  # format 1
        return [MANIFEST, LEGACY_TENSORS]
    wanted = {INFERENCE} if part == "inference" else {INFERENCE, TRAINING}
    return [MANIFEST, *sorted(n for n, f in files.items() if f.get("part") in wanted)]
