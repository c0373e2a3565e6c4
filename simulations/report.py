"""Reports people look at: one self-contained HTML page per run, and overlays of runs.

The plots are matplotlib PNGs embedded as base64, so a report opens offline, anywhere,
with no assets beside it. Everything is read from the run's own files (metrics.jsonl,
participation.jsonl, summary.json), so a report can be rebuilt for any finished run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from consortia.privacy.display import epsilon_text  # noqa: E402
from consortia.server.results import METRICS_FILE, PARTICIPATION_FILE, SUMMARY_FILE, read_jsonl  # noqa: E402

REPORT_FILE = "report.html"
STATUSES = ("trained", "refused-budget", "refused-policy", "rejected", "failed")
COLOURS = {"trained": "#2e7d32", "refused-budget": "#f9a825", "refused-policy": "#ef6c00",
           "rejected": "#c62828", "failed": "#757575"}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _load(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / PARTICIPATION_FILE), summary


def unread_rows(run_dir: Path) -> list[str]:
    """What the report leaves out: read_jsonl ends a file at its first line that does not
    parse (a crash cuts only the last), so a line damaged in the middle hides every row
    after it. One sentence per such file."""
    notes = []
    for name in (METRICS_FILE, PARTICIPATION_FILE):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        read = len(read_jsonl(path))
        if read < len(lines):
            notes.append(f"{path}: line {read + 1} of {len(lines)} cannot be read, so this "
                         f"report shows only the {read} row(s) before it (the run store keeps "
                         "every row: `consortia runs show`, the console)")
    return notes


def run_figures(rows: list[dict], participation: list[dict]) -> dict[str, str]:
    """name -> base64 PNG, for the plots this run has data for."""
    figures: dict[str, str] = {}
    rounds = [r["round"] for r in rows]
    if not rows:
        return figures

    fig, ax = _figure("Test accuracy and loss by round", "accuracy")
    evaluated = [r for r in rows if r.get("accuracy") is not None]  # see eval_every
    marker = {"marker": "o"} if len(evaluated) <= 200 else {}
    ax.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], **marker,
            color="#1565c0", label="accuracy")
    loss_ax = ax.twinx()
    loss_ax.plot([r["round"] for r in evaluated], [r["loss"] for r in evaluated],
                 **({"marker": "s"} if marker else {}), color="#c62828", label="loss")
    loss_ax.set_ylabel("loss")
    fig.legend(loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.08))
    figures["accuracy"] = _png(fig)

    by_client: dict[str, list[tuple[int, float]]] = defaultdict(list)
    budgets = set()
    for p in participation:
        if p.get("epsilon") is not None:
            by_client[p["client_id"]].append((p["round"], p["epsilon"]))
        if p.get("epsilon_budget") is not None:
            budgets.add(p["epsilon_budget"])
    user_level = [(r["round"], r["user_epsilon"]) for r in rows
                  if r.get("user_epsilon") is not None]
    if by_client or user_level:  # user-level DP may run without the clients' own DP
        fig, ax = _figure("ε spent per client (sample-level) against the budget" if by_client
                          else "ε of the model (user-level)", "ε")
        for points in by_client.values():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, color="#1565c0", alpha=0.35, linewidth=1)
        for budget in budgets:
            ax.axhline(budget, color="#c62828", linestyle="--", label=f"budget {budget:g}")
        if user_level:
            xs, ys = zip(*user_level, strict=True)
            ax.plot(xs, ys, color="#6a1b9a", linewidth=2, label="user-level ε (model)")
        ax.legend(loc="upper left")
        figures["epsilon"] = _png(fig)

    fig, ax = _figure("Clients per round by outcome", "clients")
    bottom = [0] * len(rows)
    counts = defaultdict(lambda: defaultdict(int))
    for p in participation:
        counts[p["round"]][p["status"]] += 1
    for status in STATUSES:
        heights = [counts[r][status] for r in rounds]
        if any(heights):
            ax.bar(rounds, heights, bottom=bottom, color=COLOURS[status], label=status)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.legend(loc="upper left", fontsize="small")
    figures["clients"] = _png(fig)

    if any("secagg_status" in r for r in rows):
        fig, ax = _figure("Secure aggregation per round", "clients")
        ok = [r for r in rows if r.get("secagg_status") == "ok"]
        aborted = [r for r in rows if r.get("secagg_status") == "aborted"]
        ax.bar([r["round"] for r in ok], [r.get("secagg_participants", 0) - r["secagg_dropped"]
                                          for r in ok], color="#2e7d32", label="in the secure sum")
        ax.bar([r["round"] for r in ok], [r["secagg_dropped"] for r in ok],
               bottom=[r.get("secagg_participants", 0) - r["secagg_dropped"] for r in ok],
               color="#757575", label="dropped (recovered)")
        if aborted:  # every participant's update is lost (an older row without the count: its dropped)
            ax.bar([r["round"] for r in aborted],
                   [r.get("secagg_participants") or max(1, r.get("secagg_dropped") or 1)
                    for r in aborted],
                   color="#c62828", label="round abandoned")
        ax.legend(loc="upper left", fontsize="small")
        figures["secagg"] = _png(fig)
    return figures


# Shown rounded up (epsilon_text): a table's ε is never below the one accounted.
EPSILON_COLUMNS = ("epsilon", "epsilon_if_secagg_fails", "epsilon_max", "user_epsilon")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any, column: str) -> str:
        if isinstance(value, float) and column in EPSILON_COLUMNS:
            return epsilon_text(value)
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return html.escape(", ".join(map(str, value)) or "–")
        return html.escape("–" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c), c)}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}img{max-width:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f3f3f3}.facts td:first-child{text-align:left;font-weight:600}
.warn{color:#b71c1c;font-weight:600}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` for a run (finished or not) and return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).exists():
        raise FileNotFoundError(f"{run_dir} holds no {METRICS_FILE}: not a run directory")
    rows, participation, summary = _load(run_dir)
    figures = run_figures(rows, participation)
    config = summary.get("config", {})
    facts = [("task", summary.get("task")), ("rounds", f"{len(rows)} of {summary.get('rounds', '?')}"),
             ("final accuracy", summary.get("final_accuracy")),
             ("δ (run config)", summary.get("delta")),
             ("user-level ε", None if summary.get("user_epsilon") is None
              else epsilon_text(summary["user_epsilon"])),
             ("strategy", config.get("strategy", {}).get("name")),
             ("secure aggregation", config.get("secagg", {}).get("enabled")),
             ("wall time (s)", summary.get("wall_s"))]
    facts_html = "<table class='facts'>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in facts if v is not None) + "</table>"
    images = "".join(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'></figure>"
                     for name, data in figures.items())
    clients = summary.get("clients", [])
    warnings = "".join(f"<p class='warn'>{html.escape(note)}</p>" for note in unread_rows(run_dir))
    body = (f"<h1>consortia run {html.escape(str(summary.get('run_id', run_dir.name)))}</h1>"
            f"{warnings}{facts_html}<h2>Plots</h2><div class='grid'>{images}</div>"
            f"<h2>Clients</h2>"
            + _table(clients, ["id", "epsilon", "delta", "epsilon_budget"]
                     + (["epsilon_if_secagg_fails"]
                        if any(c.get("epsilon_if_secagg_fails") is not None for c in clients) else [])
                     + ["noise_multiplier", "sample_rate",
                               "steps", "rounds_participated", "refused_rounds", "rejected_rounds",
                               "failed_rounds"])
            + "<h2>Rounds</h2>"
            + _table(rows, ["round", "accuracy", "loss", "clients_trained", "clients_refused",
                            "clients_rejected", "clients_failed", "epsilon_max", "user_epsilon",
                            "secagg_status", "duration_s"]))
    path = run_dir / REPORT_FILE
    path.write_text(_page(f"consortia run {run_dir.name}", body))
    return path


def write_comparison(run_dirs: list[str | Path], out_file: str | Path) -> Path:
    """Overlay several runs (accuracy, loss, largest client ε) in one HTML page."""
    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / METRICS_FILE).exists():
            raise FileNotFoundError(f"{d} holds no {METRICS_FILE}: not a run directory")
        rows, _, summary = _load(d)
        runs.append((d.name, rows, summary))
    figures = {}
    for key, title, ylabel in (("accuracy", "Test accuracy", "accuracy"), ("loss", "Test loss", "loss"),
                               ("epsilon_max", "Largest client ε", "ε")):
        fig, ax = _figure(title, ylabel)
        plotted = False
        for name, rows, _ in runs:
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=".", label=name)
                plotted = True
        if plotted:
            ax.legend(fontsize="small")
            figures[key] = _png(fig)
        else:
            plt.close(fig)
    table = _table([{"run": name, "final_accuracy": s.get("final_accuracy"),
                     "rounds": len(rows), "epsilon_max": rows[-1].get("epsilon_max") if rows else None,
                     "user_epsilon": s.get("user_epsilon"), "wall_s": s.get("wall_s")}
                    for name, rows, s in runs],
                   ["run", "final_accuracy", "rounds", "epsilon_max", "user_epsilon", "wall_s"])
    images = "".join(f"<figure><img alt='{k}' src='data:image/png;base64,{v}'></figure>"
                     for k, v in figures.items())
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    warnings = "".join(f"<p class='warn'>{html.escape(note)}</p>"
                       for d in run_dirs for note in unread_rows(Path(d)))
    out_file.write_text(_page("consortia comparison",
                              f"<h1>Comparison of {len(runs)} runs</h1>{warnings}{table}"
                              f"<div class='grid'>{images}</div>"))
    return out_file
