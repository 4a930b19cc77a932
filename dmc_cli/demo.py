"""`dmc demo`: the service in its embedded mode (SQLite, a local object folder, in-process
jobs, the offline stand-in model), walked through with the Python client like a user would:
an evaluation set of held-out images is uploaded, two tasks of Fashion-MNIST classes are
added, the jobs' progress is shown with each new version's evaluation against its parent,
held-out images are predicted after each task, the first version is restored (rollback)
and the predictions follow; then a class is extended and another removed, each building on
the rolled-back version."""

from __future__ import annotations

import io
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from PIL import Image

from dmc_client import Client, Job, JobFailedError

TASKS = ([0, 1, 8], [5, 7, 9])  # t-shirt, trouser, bag; then sandal, sneaker, ankle boot
PREDICT_BATCH = 32
# Short schedules: the demo should take a couple of minutes on a laptop CPU.
DEMO_LEARNER = {
    "stage1.epochs": 2,
    "stage1.batch_size": 16,
    "stage2.epochs": 5,
    "stage2.lr": 0.01,
    "calibration.samples_per_class": 64,
}


@dataclass
class DemoOptions:
    folder: Path
    cache_dir: Path
    port: int
    images_per_class: int
    test_per_class: int
    keep_serving: bool


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _pick(labels: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in classes])


class Walkthrough:
    """The user's side: the service's Python client (`dmc_client`), over HTTP."""

    def __init__(self, client: Client, options: DemoOptions) -> None:
        from dmc_core.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

        self.client = client
        self.options = options
        self.names = FASHION_MNIST_CLASSES
        self.train = load_fashion_mnist("train")
        self.test = load_fashion_mnist("test")

    def _folder(self, name: str, pixels: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Path:
        """The images `index` as a folder with one sub-folder per class (what users upload)."""
        folder = self.options.folder / "uploads" / name
        for i in index:
            target = folder / self.names[int(labels[i])] / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_png(pixels[i]))
        return folder

    def add_evaluation_set(self, classes: list[int]) -> None:
        """Held-out images (none of those predicted below) that every version is checked on."""
        images, labels = self.test
        per_class = self.options.test_per_class
        index = np.concatenate(
            [np.flatnonzero(labels == k)[per_class : 2 * per_class] for k in classes]
        )
        added = self.client.add_evaluation_set(
            "held-out", self._folder("eval", images, labels, index)
        )
        typer.echo(
            f"Evaluation set {added.name!r} (revision {added.revision}): "
            f"{sum(added.image_counts)} held-out images of {len(added.class_names)} classes"
        )

    def add_task(self, number: int, classes: list[int]) -> Job:
        images, labels = self.train
        index = _pick(labels, classes, self.options.images_per_class)
        folder = self._folder(f"task-{number}", images, labels, index)
        # progress=None: a live bar on a terminal, nothing in a log (the outcome is printed).
        try:
            return self.client.add_classes(folder, wait=True, progress=None)
        except JobFailedError as error:
            raise RuntimeError(str(error)) from error

    def predict(self, classes: list[int], version: int | None = None) -> tuple[float, list[str]]:
        """Top-1 accuracy on held-out images of `classes`, and the predicted names."""
        images, labels = self.test
        index = _pick(labels, classes, self.options.test_per_class)
        predicted: list[str] = []
        for start in range(0, len(index), PREDICT_BATCH):
            chunk = [_png(images[i]) for i in index[start : start + PREDICT_BATCH]]
            answer = self.client.predict(chunk, top_k=1, version=version)
            predicted += [p.classes[0].name for p in answer.predictions]
        truth = [self.names[int(y)] for y in labels[index]]
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
        return accuracy, predicted

    def show_evaluation(self, version_id: int) -> None:
        version = self.client.version(version_id)
        gate = version.gate or {}
        for evaluation in version.evaluations:
            old, new = evaluation.old, evaluation.new
            parts = [f"new classes {_percent(new.accuracy)}"]
            if old.images:
                parts.insert(
                    0,
                    f"old classes {_percent(old.accuracy)} (parent "
                    f"{_percent(old.parent_accuracy)})",
                )
            typer.echo(f"  evaluation on {evaluation.evaluation_set.name!r}: {', '.join(parts)}")
        if gate:
            typer.echo(f"  promotion gate: {'passed' if gate['passed'] else 'refused'}")

    def run(self) -> dict[str, Any]:
        say = typer.echo
        seen: list[int] = []
        results: dict[str, Any] = {"accuracy": [], "versions": []}
        self.add_evaluation_set([k for task in TASKS for k in task])
        for number, classes in enumerate(TASKS, 1):
            names = [self.names[k] for k in classes]
            say(
                f"\nTask {number}: client.add_classes() with {names}, "
                f"{self.options.images_per_class} images each"
            )
            job = self.add_task(number, classes)
            say(f"  job {job.id} {job.state} after {job.attempts} attempt(s)")
            if job.note:
                say(f"  {job.note}")
            version_id = job.version_id or 0
            self.show_evaluation(version_id)
            seen += classes
            self.wait_for_version(version_id)
            accuracy, _ = self.predict(seen)
            results["accuracy"].append(accuracy)
            results["versions"].append(version_id)
            say(
                f"  version v{version_id} is active; held-out accuracy on the "
                f"{len(seen)} classes learned so far: {accuracy:.1%}"
            )

        first, last = results["versions"][0], results["versions"][-1]
        new_classes = list(TASKS[-1])
        _, before = self.predict(new_classes)
        say(
            f"\nRollback: client.activate({first}) (v{last} knows "
            f"{len(seen)} classes, v{first} only {len(TASKS[0])})"
        )
        self.client.activate(first)
        self.wait_for_version(first)
        _, after = self.predict(new_classes)
        say("  held-out images of task 2's classes, predicted before and after the rollback:")
        for old, new in list(zip(before, after, strict=True))[:: max(1, len(after) // 5)][:5]:
            say(f"    {old:>12} -> {new}")
        results["rollback_changed"] = sum(a != b for a, b in zip(before, after, strict=True))
        results["after_rollback"] = sorted(set(after))
        say(
            f"  {results['rollback_changed']} of {len(after)} answers changed; v{first} can "
            f"only answer {sorted(set(after))}"
        )
        self.lifecycle(results, first)
        return results

    def lifecycle(self, results: dict[str, Any], rolled_back_to: int) -> None:
        """Extend a class, then remove one: each a job and a new version, built on the
        version rolled back to (a rollback lasts)."""
        say = typer.echo
        kept, dropped = self.names[TASKS[0][0]], self.names[TASKS[0][-1]]
        images, labels = self.train
        index = _pick(labels, [TASKS[0][0]], self.options.images_per_class)[::-1]
        more = [_png(images[i]) for i in index]
        say(f"\nExtend: client.extend_class({kept!r}) with {len(more)} more images")
        extended = self.client.extend_class(kept, more, progress=None)
        say(
            f"  version v{extended.version_id} builds on v{rolled_back_to}; {kept}'s "
            "statistics merged with the new images', prompts trained again"
        )
        say(f"\nRemove: client.remove_class({dropped!r})")
        removed = self.client.remove_class(dropped)
        removed_id = removed.version_id or 0
        self.wait_for_version(removed_id)
        _, answers = self.predict(list(TASKS[0]))
        classes = [c.name for c in self.client.classes()]
        say(f"  version v{removed_id} knows {classes}")
        say(f"  held-out images of task 1's classes are now predicted as {sorted(set(answers))}")
        results["extended_parent"] = self.client.version(extended.version_id or 0).parent_id
        results["after_remove"] = sorted(set(answers))

    def wait_for_version(self, version_id: int, timeout: float = 60.0) -> None:
        """Until predict answers with `version_id` (the server swaps versions in the background)."""
        images, _ = self.test
        probe = [_png(images[0])]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.predict(probe, top_k=1).version_id == version_id:
                return
            time.sleep(0.3)
        raise TimeoutError(f"the server did not switch to version {version_id}")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}%"


def demo_settings(options: DemoOptions) -> Any:
    from dmc_core.standin import STANDIN_NAME
    from server.settings import ServerSettings

    return ServerSettings(
        database_url=f"sqlite:///{options.folder / 'dmc.sqlite'}",
        objects_dir=options.folder / "objects",
        dispatcher="embedded",
        auth_enabled=False,
        backbone_name=STANDIN_NAME,
        backbone_pretrained=None,
        model_cache_dir=options.cache_dir,
        device="cpu",
        # Replay as many samples per old class as there are real images per new class.
        learner_overrides=DEMO_LEARNER | {"stage2.samples_per_old_class": options.images_per_class},
        host="127.0.0.1",
        port=options.port,
        version_poll_seconds=0.5,
    )


def run_service_demo(options: DemoOptions) -> dict[str, Any]:
    """Serve in this process (Ctrl-C stops it) and walk through from a second thread."""
    import uvicorn

    from dmc_core.standin import STANDIN_NAME, build_standin
    from server.app import create_app

    typer.echo(f"Building the offline stand-in model ({STANDIN_NAME}) if needed ...")
    build_standin(options.cache_dir, progress=lambda message: typer.echo(f"  {message}"))
    shutil.rmtree(options.folder, ignore_errors=True)  # a fresh service each time
    options.folder.mkdir(parents=True)
    settings = demo_settings(options)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=settings.host, port=options.port, log_level="warning"
        )
    )
    url = f"http://{settings.host}:{options.port}"
    outcome: dict[str, Any] = {}

    def walk() -> None:
        try:
            while not server.started:
                time.sleep(0.1)
            typer.echo(f"Service running at {url} (embedded mode, data in {options.folder})")
            with Client(url, timeout=120) as client:
                outcome.update(Walkthrough(client, options).run())
            typer.echo(
                f"\nDashboard: {url}/admin (auth is off in the demo: any key signs in)"
                f"\nAPI docs:  {url}/docs"
            )
            if options.keep_serving:
                typer.echo("The server keeps running; Ctrl-C stops it.")
            else:
                server.should_exit = True
        except BaseException as exc:
            outcome["error"] = exc
            server.should_exit = True

    thread = threading.Thread(target=walk, name="demo-walkthrough", daemon=True)
    thread.start()
    server.run()
    if "error" in outcome:
        raise outcome["error"]
    return outcome
