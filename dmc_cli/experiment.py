"""`dmc experiment` and `dmc report`: the research commands. They import dmc_core only when
they run, and never the web or database stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def experiment(
    config: Annotated[Path, typer.Argument(help="experiment YAML file (see configs/)")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="override a setting by dotted key, value parsed as YAML, e.g. "
            "--set learner.stage1.epochs=1 --set seeds=[1993,1994]; repeatable",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder; default runs/<experiment name>")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out from its last task")
    ] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run a class-incremental experiment: every method on every seed, task by task."""
    from dmc_core.data.registry import DatasetError
    from dmc_core.experiment.config import ExperimentError, load_experiment_config
    from dmc_core.experiment.runner import run_experiment

    try:
        experiment_config = load_experiment_config(config, list(set_ or []))
        folder = out if out is not None else Path("runs") / experiment_config.name
        results = run_experiment(experiment_config, folder, resume=resume, show_progress=progress)
    except (ExperimentError, DatasetError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo((folder / "results.md").read_text())
    typer.echo(f"results: {folder / 'results.json'} ({len(results['runs'])} runs)")


def report(
    folders: Annotated[list[Path], typer.Argument(help="run folders (with results.json)")],
    out: Annotated[Path, typer.Option(help="where report.md/.png/.json go")] = Path("report"),
) -> None:
    """Merge several run folders into one table and plot (mean ± std over seeds)."""
    from dmc_core.experiment.report import merge_reports

    try:
        merge_reports(folders, out)
    except (FileNotFoundError, ValueError, KeyError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.png'}")
