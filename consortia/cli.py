"""The `consortia` command."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consortia.config import ConfigError, config_to_dict, load_config
from consortia.version import __version__

app = typer.Typer(help="consortia: federated learning with client-enforced differential privacy.",
                  no_args_is_help=True, add_completion=False)
sim_app = typer.Typer(help="Simulated federations (researchers).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)

SetOption = typer.Option(None, "--set", help="Override a config key: key=value (dotted for sections).")


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


@sim_app.command("config")
def sim_config(config: Path | None = typer.Argument(None), overrides: list[str] | None = SetOption) -> None:
    """Validate a config and print it resolved (defaults filled in) as JSON."""
    typer.echo(json.dumps(config_to_dict(_load(config, overrides)), indent=2))


@sim_app.command("run")
def sim_run(
    config: Path = typer.Argument(..., help="experiment TOML"),
    out: Path = typer.Option(..., "--out", help="results directory"),
    overrides: list[str] | None = SetOption,
    resume: bool = typer.Option(False, "--resume",
                                help="continue the run in --out from its latest checkpoint"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's own log"),
) -> None:
    """Run a federation of virtual clients; write metrics.jsonl, summary.json and checkpoints to --out."""
    from consortia.simulations.runner import ResultsDirError, run_simulation

    cfg = _load(config, overrides)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{cfg.task}", total=cfg.rounds, status="starting Ray...")

        def on_round(row: dict) -> None:
            eps = row["epsilon_max"]
            status = (f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}  trained "
                      f"{row['clients_trained']}/{row['clients_sampled']}"
                      + (f"  ε max {eps:.2f}" if eps is not None else ""))
            progress.update(bar, completed=row["round"], status=status)

        try:
            summary = run_simulation(cfg, out, resume=resume, on_round=on_round, verbose=verbose)
        except (ResultsDirError, ConfigError, FileNotFoundError, ValueError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
    acc = summary["final_accuracy"]
    console.print(f"final accuracy {acc:.4f}" if acc is not None else "no round completed")
    typer.echo(f"results: {out.resolve()}  (metrics.jsonl, summary.json, checkpoints/)")


@bench_app.command("dp")
def bench_dp(
    task: str = typer.Option("fashion-mnist-cnn", help="task whose model to time"),
    batch_size: int = typer.Option(64),
    steps: int = typer.Option(20, help="timed steps per mode (after 3 warm-up steps)"),
    repeats: int = typer.Option(3, help="repeats; the median is reported"),
) -> None:
    """ms per DP-SGD step: non-private vs Opacus per-sample hooks vs ghost clipping."""
    from consortia.simulations.bench import bench_dp as run

    typer.echo(json.dumps(run(task=task, batch_size=batch_size, steps=steps, repeats=repeats)))


if __name__ == "__main__":
    app()
