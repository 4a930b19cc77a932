"""`dmc_client.Client` and `dmc client ...` against a real running server (embedded mode,
uvicorn in a thread, the tiny model): uploads from a folder and an archive with a progress
bar, predict, versions, activate, jobs, evaluation sets, and each refusal as its typed
error carrying the server's message."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmc_cli.main import app
from dmc_client import (
    AuthenticationError,
    Client,
    ConflictError,
    ConnectionFailedError,
    InvalidRequestError,
    NotFoundError,
)
from server.settings import ServerSettings
from tests.core.toy import save_colour_folder
from tests.server.conftest import (  # noqa: F401  (fixtures)
    ADMIN_KEY,
    checkpoint,
    free_port,
    live_server,
    settings_factory,
)


@pytest.fixture
def url(settings_factory: Callable[..., ServerSettings]) -> Iterator[str]:  # noqa: F811
    with live_server(settings_factory(port=free_port())) as served:
        yield served


def test_the_client_against_a_running_server(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(url, ADMIN_KEY, poll_seconds=0.05) as dmc:
        first = dmc.add_classes(save_colour_folder(tmp_path / "a", {"red": 0, "green": 1}, 4, 0))
        assert first.state == "succeeded" and first.version_id == 1
        assert "100%" in capsys.readouterr().err  # the progress bar reached its end

        archive = shutil.make_archive(
            str(tmp_path / "b"), "zip", save_colour_folder(tmp_path / "b", {"blue": 2}, 4, 1)
        )
        queued = dmc.add_classes(archive, wait=False)
        assert queued.state in ("queued", "running")
        second = dmc.wait(queued.id, progress=False)
        assert second.version_id == 2

        images = sorted((tmp_path / "a" / "red").glob("*.png"))[:2]
        answer = dmc.predict(images, top_k=2)
        assert answer.version_id in (1, 2) and len(answer.predictions) == 2
        assert answer.predictions[0].filename == images[0].name
        assert {c.name for c in answer.predictions[0].classes} <= {"red", "green", "blue"}

        assert [(v.id, v.active) for v in dmc.versions()] == [(2, True), (1, False)]
        assert dmc.activate(1).active
        assert [j.version_id for j in dmc.jobs()] == [2, 1]

        eval_set = dmc.add_evaluation_set(
            "held-out", save_colour_folder(tmp_path / "e", {"red": 0, "blue": 2}, 2, 5)
        )
        assert (eval_set.name, eval_set.revision) == ("held-out", 1)
        assert [s.id for s in dmc.evaluation_sets()] == [eval_set.id]
        [evaluation] = dmc.evaluate(2).evaluations
        assert evaluation.baseline_id == 1 and evaluation.new.images == 2

        with pytest.raises(ConflictError, match="red"):
            dmc.add_classes(tmp_path / "a")
        with pytest.raises(InvalidRequestError) as refused:
            dmc.predict([b"not an image"])
        assert refused.value.status_code == 422 and refused.value.message
        with pytest.raises(NotFoundError, match="version 9"):
            dmc.activate(9)
        with pytest.raises(FileNotFoundError):
            dmc.add_classes(tmp_path / "missing")

        # The lifecycle calls build on the active version (v1 after the rollback above).
        extended = dmc.extend_class("red", images, progress=False)
        assert dmc.version(extended.version_id or 0).parent_id == 1
        renamed = dmc.rename_class("green", "lime")
        assert sorted(c.name for c in dmc.classes()) == ["lime", "red"]
        removed = dmc.remove_class("red")
        assert [c.name for c in dmc.classes()] == ["lime"]
        assert dmc.version(removed.version_id or 0).change["kind"] == "remove"
        assert renamed.version_id == extended.version_id + 1  # type: ignore[operator]
        assert dmc.delete_version(2) == [2]
        with pytest.raises(NotFoundError):
            dmc.remove_class("red")
    with Client(url, "not-a-key") as stranger, pytest.raises(AuthenticationError, match="valid"):
        stranger.versions()
    with Client(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(ConnectionFailedError):
        nowhere.versions()


def test_the_command_line(url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"DMC_URL": url, "DMC_API_KEY": ADMIN_KEY}
    folder = save_colour_folder(tmp_path / "a", {"red": 0, "green": 1}, 4, 0)
    added = runner.invoke(app, ["client", "add", str(folder)], env=env)
    assert added.exit_code == 0, added.output
    assert '"state": "succeeded"' in added.output
    listed = runner.invoke(app, ["client", "versions"], env=env)
    assert listed.exit_code == 0 and "* v1" in listed.output
    image = next((folder / "green").glob("*.png"))
    predicted = runner.invoke(app, ["client", "predict", str(image), "--top-k", "1"], env=env)
    assert predicted.exit_code == 0 and '"version_id": 1' in predicted.output, predicted.output
    missing = runner.invoke(app, ["client", "activate", "5"], env=env)
    assert missing.exit_code == 1 and "version 5 does not exist" in missing.output
    keyless = runner.invoke(app, ["client", "versions"], env={"DMC_URL": url})
    assert keyless.exit_code == 1 and "X-API-Key" in keyless.output
