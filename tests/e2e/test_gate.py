"""The promotion gate end to end over HTTP on the embedded service (through the client):
a normal update is activated; an update with mislabelled images (images of the old
classes uploaded as new classes) hurts the old classes, so its version is published but not
activated and the job says why; an upload's override lets such a version through."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dmc_client import Client
from server.settings import ServerSettings
from tests.core.toy import save_colour_folder
from tests.server.conftest import (  # noqa: F401  (fixtures)
    ADMIN_KEY,
    LEARNER_OVERRIDES,
    MEMORY_SCHEDULE,
    checkpoint,
    free_port,
    live_server,
    settings_factory,
)


def test_gate_refuses_a_worse_version_and_accepts_a_normal_one(
    tmp_path: Path,
    settings_factory: Callable[..., ServerSettings],  # noqa: F811
) -> None:
    settings = settings_factory(
        port=free_port(),
        gate_max_old_drop=15.0,
        gate_min_new_accuracy=80.0,
        learner_overrides=LEARNER_OVERRIDES | MEMORY_SCHEDULE,
    )
    folder = tmp_path / "uploads"
    held_out = {"red": 0, "green": 1, "blue": 2, "yellow": 3}
    with live_server(settings) as url, Client(url, ADMIN_KEY, poll_seconds=0.05) as dmc:
        dmc.add_evaluation_set("colours", save_colour_folder(folder / "eval", held_out, 6, 9))
        first = dmc.add_classes(save_colour_folder(folder / "a", {"red": 0, "green": 1}, 6, 1))
        normal = dmc.add_classes(save_colour_folder(folder / "b", {"blue": 2, "yellow": 3}, 6, 2))
        assert first.note is None and normal.note is None
        accepted = dmc.version(normal.version_id or 0)
        assert accepted.active and accepted.gate and accepted.gate["passed"]
        assert accepted.evaluations[0].old.images == 12

        # Images of the four old colours, labelled as four new classes: the old ones suffer.
        mislabelled = {"crimson": 0, "lime": 1, "navy": 2, "gold": 3}
        worse = save_colour_folder(folder / "c", mislabelled, 6, 3)
        refused = dmc.add_classes(worse)
        assert refused.state == "succeeded" and refused.note is not None
        assert "not activated" in refused.note and "old classes dropped" in refused.note
        version = dmc.version(refused.version_id or 0)
        assert not version.active and version.gate and not version.gate["passed"]
        [evaluation] = version.evaluations
        assert evaluation.old.change is not None and evaluation.old.change < -15
        assert [v.id for v in dmc.versions() if v.active] == [normal.version_id]

        # The same kind of update with a permissive override for this upload goes through.
        overridden = dmc.add_classes(
            save_colour_folder(folder / "d", {"scarlet": 0}, 6, 4), gate_max_old_drop=100
        )
        assert overridden.note is None
        assert dmc.version(overridden.version_id or 0).active
        # Rollback keeps working: the refused version can still be activated by hand.
        assert dmc.activate(refused.version_id or 0).active
