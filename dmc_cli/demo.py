"""`dmc demo`: the service in its embedded mode (SQLite, a local object folder, in-process
jobs, the offline stand-in model), walked through over HTTP like a user would: two tasks of
Fashion-MNIST classes are added, the jobs' progress is shown, held-out images are predicted
after each task, the first version is restored (rollback) and the predictions follow; then
a class is extended and another removed, each building on the rolled-back version."""

from __future__ import annotations

import io
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import typer
from PIL import Image
from tqdm import tqdm

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
    """The user's side: plain HTTP calls against the running server."""

    def __init__(self, client: httpx.Client, options: DemoOptions) -> None:
        from dmc_core.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

        self.client = client
        self.options = options
        self.names = FASHION_MNIST_CLASSES
        self.train = load_fashion_mnist("train")
        self.test = load_fashion_mnist("test")

    def add_task(self, classes: list[int]) -> dict[str, Any]:
        images, labels = self.train
        index = _pick(labels, classes, self.options.images_per_class)
        files = [("images", (f"{i}.png", _png(images[i]), "image/png")) for i in index]
        data = {"labels": [self.names[int(labels[i])] for i in index]}
        response = self.client.post("/classes", files=files, data=data)
        response.raise_for_status()
        return response.json()

    def follow(self, job_id: int) -> dict[str, Any]:
        # disable=None: a live bar on a terminal, nothing in a log (the outcome is printed).
        with tqdm(total=100, bar_format="{desc} |{bar}| {n:.0f}%", disable=None) as bar:
            while True:
                job = self.client.get(f"/jobs/{job_id}").json()
                bar.set_description(f"  job {job_id} {job['state']:9} {job['progress']['stage']:7}")
                bar.n = job["progress"]["percent"]
                bar.refresh()
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(0.5)

    def predict(self, classes: list[int], version: int | None = None) -> tuple[float, list[str]]:
        """Top-1 accuracy on held-out images of `classes`, and the predicted names."""
        images, labels = self.test
        index = _pick(labels, classes, self.options.test_per_class)
        predicted: list[str] = []
        for start in range(0, len(index), PREDICT_BATCH):
            chunk = index[start : start + PREDICT_BATCH]
            files = [("images", (f"{i}.png", _png(images[i]), "image/png")) for i in chunk]
            params = {"top_k": 1} | ({"version": version} if version else {})
            response = self.client.post("/predict", files=files, params=params)
            response.raise_for_status()
            predicted += [p["classes"][0]["name"] for p in response.json()["predictions"]]
        truth = [self.names[int(y)] for y in labels[index]]
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
        return accuracy, predicted

    def run(self) -> dict[str, Any]:
        say = typer.echo
        seen: list[int] = []
        results: dict[str, Any] = {"accuracy": [], "versions": []}
        for number, classes in enumerate(TASKS, 1):
            names = [self.names[k] for k in classes]
            say(
                f"\nTask {number}: POST /classes with {names}, {self.options.images_per_class} "
                "images each"
            )
            submitted = self.add_task(classes)
            job = self.follow(submitted["job_id"])
            say(f"  job {job['id']} {job['state']} after {job['attempts']} attempt(s)")
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job['id']} ended {job['state']}: {job['error']}")
            seen += classes
            self.wait_for_version(job["version_id"])
            accuracy, _ = self.predict(seen)
            results["accuracy"].append(accuracy)
            results["versions"].append(job["version_id"])
            say(
                f"  version v{job['version_id']} is active; held-out accuracy on the "
                f"{len(seen)} classes learned so far: {accuracy:.1%}"
            )

        first, last = results["versions"][0], results["versions"][-1]
        new_classes = list(TASKS[-1])
        _, before = self.predict(new_classes)
        say(
            f"\nRollback: POST /versions/{first}/activate (v{last} knows "
            f"{len(seen)} classes, v{first} only {len(TASKS[0])})"
        )
        self.client.post(f"/versions/{first}/activate").raise_for_status()
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
        files = [("images", (f"more-{i}.png", _png(images[i]), "image/png")) for i in index]
        say(f"\nExtend: POST /classes/{kept}/images with {len(index)} more images")
        extended = self.follow(self._submitted(f"/classes/{kept}/images", files=files))
        say(
            f"  version v{extended['version_id']} builds on v{rolled_back_to}; {kept}'s "
            "statistics merged with the new images', prompts trained again"
        )
        say(f"\nRemove: DELETE /classes/{dropped}")
        removed = self.follow(self._submitted(f"/classes/{dropped}", method="DELETE"))
        self.wait_for_version(removed["version_id"])
        _, answers = self.predict(list(TASKS[0]))
        classes = [c["name"] for c in self.client.get("/classes").json()]
        say(f"  version v{removed['version_id']} knows {classes}")
        say(f"  held-out images of task 1's classes are now predicted as {sorted(set(answers))}")
        results["extended_parent"] = self.client.get(f"/versions/{extended['version_id']}").json()[
            "parent_id"
        ]
        results["after_remove"] = sorted(set(answers))

    def _submitted(self, path: str, method: str = "POST", **kwargs: Any) -> int:
        response = self.client.request(method, path, **kwargs)
        response.raise_for_status()
        job_id: int = response.json()["job_id"]
        return job_id

    def wait_for_version(self, version_id: int, timeout: float = 60.0) -> None:
        """Until predict answers with `version_id` (the server swaps versions in the background)."""
        images, _ = self.test
        files = [("images", ("probe.png", _png(images[0]), "image/png"))]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.client.post("/predict", files=files)
            if response.status_code == 200 and response.json()["version_id"] == version_id:
                return
            time.sleep(0.3)
        raise TimeoutError(f"the server did not switch to version {version_id}")


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
            with httpx.Client(base_url=url, timeout=120) as client:
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
