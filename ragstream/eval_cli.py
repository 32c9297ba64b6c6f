"""`ragstream eval FILE.jsonl`: judge an Agent Evaluation eval set, print the results, write
them to Iceberg, and gate CI on pass rates (`--fail-under groundedness=0.9`).

Exit codes: 0 every `--fail-under` holds, 1 one does not, 2 bad input (a malformed file, an
unknown judge, a malformed `--fail-under`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ragstream.evaluation import EvalFileError, EvalRun, RowResult, load_eval_file, run_eval, write_run
from ragstream.infra.settings import load_settings

__all__ = ["evaluate"]

out = Console()
err = Console(stderr=True)


def _parse_fail_under(specs: list[str]) -> dict[str, float]:
    rules: dict[str, float] = {}
    for spec in specs:
        name, _, rate = spec.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not name or not 0.0 <= value <= 1.0:
            err.print(f"[red]--fail-under {spec!r}[/]: expected judge=rate with a rate between 0 and 1")
            raise typer.Exit(2)
        rules[name.strip()] = value
    return rules


def _mark(rating: str | None) -> str:
    return {"yes": "[green]yes[/]", "no": "[red]no[/]"}.get(rating or "", "[yellow]error[/]")


def _print_table(run: EvalRun) -> None:
    judges = [*run.judges, "overall"]
    table = Table(title=f"ragstream eval · run {run.run_id}")
    table.add_column("row")
    for j in judges:
        table.add_column(j)
    table.add_column("root cause")
    for r in run.results:
        by = {v.judge: v for v in r.verdicts}
        cells = [_mark(by[j].rating) if j in by else "·" for j in run.judges]
        table.add_row(str(r.row.request_id), *cells, _mark(r.overall.rating), r.root_cause or "")
    out.print(table)
    summary = Table(title="aggregates")
    summary.add_column("judge")
    summary.add_column("pass rate")
    summary.add_column("judged")
    summary.add_column("errors")
    summary.add_column("latency p50")
    for j in judges:
        verdicts = [v for r in run.results for v in ([*r.verdicts, r.overall]) if v.judge == j]
        judged = [v for v in verdicts if v.rating is not None]
        passed = sum(v.rating == "yes" for v in judged)
        lat = [v.latency_ms for v in verdicts]
        summary.add_row(
            j,
            f"{passed / len(judged):.2f}" if judged else "n/a",
            str(len(judged)),
            str(len(verdicts) - len(judged)),
            f"{statistics.median(lat):.1f} ms" if lat else "",
        )
    out.print(summary)
    causes = run.root_causes()
    if causes:
        out.print("root causes: " + ", ".join(f"{k} {n}" for k, n in causes.most_common()))
    tokens = [r.total_tokens for r in run.results if r.total_tokens is not None]
    if tokens:
        out.print(f"pipeline tokens: {sum(tokens)} over {len(tokens)} answered rows")


def _row_json(r: RowResult) -> str:
    return json.dumps(
        {
            "request_id": r.row.request_id,
            "judges": {
                v.judge: {"rating": v.rating, "score": v.score, "rationale": v.rationale, "error": v.error}
                for v in r.verdicts
            },
            "overall": {
                "rating": r.overall.rating,
                "root_cause": r.root_cause,
                "rationale": r.overall.rationale,
            },
        },
        ensure_ascii=False,
    )


def evaluate(
    file: Annotated[Path, typer.Argument(help="An Agent Evaluation eval set (JSON lines).")],
    judges: Annotated[
        list[str] | None,
        typer.Option("--judges", help="Judges to run, comma-separated or repeated (default: judges.judges)."),
    ] = None,
    run_pipeline: Annotated[
        bool, typer.Option("--run-pipeline", help="Ask the live stack for rows without a response.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row on stdout.")] = False,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", help="judge=rate: exit 1 when that judge's pass rate is lower."),
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant for --run-pipeline questions.")] = None,
    no_table: Annotated[bool, typer.Option("--no-table", help="Do not write the evaluations table.")] = False,
) -> None:
    """Judge an eval set with the stream's judges; write the run to the `evaluations` table."""
    from ragstream.infra.judges.panel import UnknownJudge

    rules = _parse_fail_under(fail_under or [])
    names = [n.strip() for spec in judges or [] for n in spec.split(",") if n.strip()]
    settings = load_settings()
    try:
        rows = load_eval_file(file)
        run = asyncio.run(
            run_eval(
                settings,
                rows,
                judges=names or None,
                run_pipeline=run_pipeline,
                tenant=tenant,
                source_file=str(file),
                on_row=(lambda r: out.print(_row_json(r), markup=False, highlight=False, soft_wrap=True))
                if as_json
                else None,
            )
        )
    except (EvalFileError, UnknownJudge) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if not as_json:
        _print_table(run)
    if not no_table:
        written = write_run(settings, run)
        err.print(f"wrote {written} rows to the evaluations table (run {run.run_id})")
    rates = run.pass_rates()
    failed = []
    for name, floor in rules.items():
        passed, judged = rates.get(name, (0, 0))
        rate = passed / judged if judged else 0.0
        if rate < floor:
            failed.append(f"{name} {rate:.2f} < {floor:.2f}")
    if failed:
        err.print("[red]below --fail-under:[/] " + "; ".join(failed))
        raise typer.Exit(1)
