"""The `ragstream` command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ragstream.acls_cli import acls_app
from ragstream.audit_cli import audit_app
from ragstream.audit_cli import sql as audit_sql_command
from ragstream.dashboard_cli import dashboard as dashboard_command
from ragstream.dashboard_cli import login_url
from ragstream.eval_cli import evaluate
from ragstream.guard_cli import guard_app
from ragstream.health import stack_health
from ragstream.infra.logs import configure_logging
from ragstream.infra.settings import Settings, load_settings
from ragstream.judge_cli import judge_app
from ragstream.monitor_cli import monitor_app
from ragstream.schemas.errors import RagstreamError
from ragstream.token_cli import token_app

if TYPE_CHECKING:
    from ragstream.client import AskOptions

app = typer.Typer(
    help="ragstream: documents and questions over Kafka, models on Triton, answers you can audit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
schemas_app = typer.Typer(
    help="Event contracts (JSON Schema) for producers in any language.", no_args_is_help=True
)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
app.add_typer(audit_app, name="audit")
app.command("sql")(audit_sql_command)
app.add_typer(topics_app, name="topics")
app.add_typer(token_app, name="token")
app.add_typer(acls_app, name="acls")
app.add_typer(guard_app, name="guard")
app.add_typer(judge_app, name="judge")
app.add_typer(monitor_app, name="monitor")
app.command(name="dashboard")(dashboard_command)
app.command("eval")(evaluate)

console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (TOML/YAML/JSON). Env: RAGSTREAM_CONFIG_FILE."),
]
TenantOpt = Annotated[
    str | None, typer.Option("--tenant", "-t", help="Tenant (default: settings.default_tenant).")
]
GroupOpt = Annotated[
    list[str] | None, typer.Option("--group", "-g", help="Access group; repeat for several.")
]


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    configure_logging(settings)
    return settings


# -- stack -------------------------------------------------------------------------------
@app.command()
def up(
    config: ConfigOpt = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start in the background and return once ready.")
    ] = False,
) -> None:
    """Start the embedded stack: broker, Triton, workers, LanceDB and the Iceberg catalog.

    In the foreground, Ctrl-C stops everything. With --detach, use `ragstream down`.
    """
    from ragstream.infra.supervisor import pid_alive, read_state
    from ragstream.stack import build_supervisor, state_path

    settings = _settings(config)
    state = read_state(state_path(settings))
    if state and pid_alive(state.get("supervisor_pid")):
        err.print(
            f"[red]A stack is already running (supervisor pid {state['supervisor_pid']}).[/] Use `ragstream down`."
        )
        raise typer.Exit(1)

    if detach:
        _up_detached(settings, config)
        return

    supervisor = build_supervisor(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        supervisor.request_stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        ready_s = supervisor.start()
    except KeyboardInterrupt:
        supervisor.stop()
        err.print("stopped before the stack was ready")
        raise typer.Exit(130) from None
    console.print(f"[green]ragstream is up[/] in {ready_s:.1f}s (data dir {settings.data_dir})")
    _print_status(settings)
    _print_dashboard(settings)
    console.print("Ctrl-C to stop.")
    signal.signal(signal.SIGTERM, lambda *_: supervisor.request_stop())
    try:
        supervisor.run_forever()
    except KeyboardInterrupt:
        supervisor.stop()
    console.print("ragstream stopped.")


def _up_detached(settings: Settings, config: Path | None) -> None:
    from ragstream.infra.supervisor import read_state
    from ragstream.stack import state_path

    settings.log_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(settings)
    path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "ragstream", "up"] + (["--config", str(config)] if config else [])
    log_path = settings.log_dir / "supervisor.log"
    started = time.monotonic()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    while True:
        code = proc.poll()
        state = read_state(path)
        if state and state.get("phase") == "ready":
            break
        if code is not None:
            err.print(f"[red]ragstream failed to start[/] (exit {code}). See {log_path}:")
            err.print(_tail(log_path), markup=False, highlight=False)
            raise typer.Exit(1)
        if time.monotonic() - started > settings.ready_timeout_s + 30:
            err.print(f"[red]not ready after {settings.ready_timeout_s:.0f}s[/]; see {log_path}")
            raise typer.Exit(1)
        time.sleep(0.2)
    console.print(
        f"[green]ragstream is up[/] in {state.get('ready_after_s') or 0:.1f}s "
        f"(supervisor pid {proc.pid}, logs in {settings.log_dir})"
    )
    _print_status(settings)
    _print_dashboard(settings)


def _print_dashboard(settings: Settings) -> None:
    if settings.dashboard.enabled:
        console.print("dashboard (this link signs you in as the stack's admin; keep it private):")
        print(login_url(settings))


@app.command()
def down(config: ConfigOpt = None) -> None:
    """Stop the stack started by `ragstream up`, leaving no process behind."""
    from ragstream.infra.supervisor import stop_stack
    from ragstream.stack import state_path

    settings = _settings(config)
    if stop_stack(state_path(settings)):
        console.print("ragstream stopped.")
    else:
        console.print("ragstream is not running.")


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the health of each component. Exit code 1 if any is down."""
    settings = _settings(config)
    rows = stack_health(settings)
    if as_json:
        console.print_json(json.dumps(rows))
    else:
        _print_status(settings, rows)
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


def _print_status(settings: Settings, rows: list[dict[str, Any]] | None = None) -> None:
    rows = rows if rows is not None else stack_health(settings)
    table = Table(title="ragstream status")
    for col in ("component", "state", "pid", "restarts", "detail"):
        table.add_column(col)
    for r in rows:
        state = "[green]up[/]" if r["healthy"] else "[red]down[/]"
        restarts = str(r["restarts"] or 0) + (f" ({r['last_exit']})" if r.get("last_exit") else "")
        table.add_row(r["component"], state, str(r["pid"] or ""), restarts, r["detail"])
    console.print(table)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- documents ---------------------------------------------------------------------------
@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories (.txt .md .html .pdf).")],
    config: ConfigOpt = None,
    tenant: TenantOpt = None,
    group: GroupOpt = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", "-m", help="Metadata key=value; repeatable.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until every document is indexed or dead-lettered.")] = True,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="How long to wait for outcomes.")] = 600.0,
) -> None:
    """Publish documents and report what became of each: indexed, unchanged or dead-lettered."""
    from ragstream.ingest import ingest as run_ingest

    settings = _settings(config)
    metadata = _parse_meta(meta or [])
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        published = progress.add_task("published", total=None)
        done = progress.add_task("finished ", total=None, visible=wait)

        def on_published(i: int, n: int) -> None:
            progress.update(published, completed=i, total=n)
            progress.update(done, total=n)

        report = run_ingest(
            settings,
            paths,
            tenant=tenant,
            groups=group or [],
            metadata=metadata,
            wait=wait,
            timeout_s=timeout_s,
            on_published=on_published,
            on_outcome=lambda _o: progress.advance(done),
        )
    _print_ingest_report(report, wait)
    if not report.ok:
        raise typer.Exit(2)


@app.command()
def delete(
    document_ids: Annotated[list[str], typer.Argument(help="Document ids to delete.")],
    config: ConfigOpt = None,
    tenant: TenantOpt = None,
) -> None:
    """Delete documents: their chunks leave the index."""
    from ragstream.ingest import ingest as run_ingest

    settings = _settings(config)
    report = run_ingest(settings, [], tenant=tenant, delete_ids=document_ids)
    _print_ingest_report(report, True)
    if not report.ok:
        raise typer.Exit(2)


def _print_ingest_report(report: Any, waited: bool) -> None:
    if not waited:
        console.print(f"published {len(report.outcomes) or 'all'} documents (not waiting for outcomes)")
        return
    bad = [o for o in report.outcomes if o.status in ("dead_lettered", "timeout")]
    if bad:
        table = Table(title="not indexed")
        table.add_column("document")
        table.add_column("status")
        table.add_column("reason")
        for o in bad:
            table.add_row(o.document_id, o.status, o.reason)
        console.print(table)
    parts = [
        f"{report.count(s)} {s}"
        for s in ("indexed", "unchanged", "deleted", "stale", "dead_lettered", "timeout")
        if report.count(s)
    ]
    console.print(
        f"[bold]{len(report.outcomes)} documents[/]: {', '.join(parts) or 'nothing to do'}; "
        f"{report.chunks} chunks written in {report.elapsed_s:.1f}s"
    )


def _parse_meta(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--meta expects key=value, got {item!r}")
        out[key] = _scalar(value)
    return out


def _scalar(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    config: ConfigOpt = None,
    tenant: TenantOpt = None,
    group: GroupOpt = None,
    mode: Annotated[str, typer.Option(help="hybrid, vector or keyword.")] = "hybrid",
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    alpha: Annotated[float, typer.Option(help="Hybrid weighting: 1 = vector only, 0 = keyword only.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Search the index directly (the same search the retrieval stage runs)."""
    settings = _settings(config)
    hits = asyncio.run(
        _search(settings, query, tenant or settings.default_tenant, group or [], mode, top_k, alpha)
    )
    if as_json:
        console.print_json(
            json.dumps(
                [h.model_dump() if hasattr(h, "model_dump") else h.__dict__ for h in hits], default=str
            )
        )
        return
    table = Table(title=f"{mode} search: {query}")
    for col in ("#", "score", "document", "chunk", "heading", "text"):
        table.add_column(col, overflow="fold")
    for i, h in enumerate(hits, 1):
        heading = " > ".join(h.headings) if getattr(h, "headings", None) else ""
        text = h.text.replace("\n", " ")
        table.add_row(
            str(i),
            f"{h.score:.4f}",
            h.document_id,
            str(h.chunk_index),
            heading,
            text[:160] + ("…" if len(text) > 160 else ""),
        )
    console.print(table)


_ASK_EXIT = {"ok": 0, "error": 1, "blocked": 3}


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    config: ConfigOpt = None,
    tenant: TenantOpt = None,
    group: GroupOpt = None,
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="Who asks (with the local key; a given token says who asks)."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Chunks to retrieve.")] = 5,
    alpha: Annotated[float, typer.Option(help="Hybrid weighting: 1 = vector only, 0 = keyword only.")] = 0.5,
    mode: Annotated[str, typer.Option(help="Retrieval: hybrid, vector or keyword.")] = "hybrid",
    neighbours: Annotated[int, typer.Option(help="Also use this many chunks either side of each hit.")] = 0,
    document_id: Annotated[
        list[str] | None, typer.Option("--document-id", help="Search only these documents (repeatable).")
    ] = None,
    route: Annotated[
        str | None,
        typer.Option(help="Generation route (names the model); default: generation.default_route."),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 256,
    temperature: Annotated[float, typer.Option()] = 0.2,
    deadline_ms: Annotated[int, typer.Option("--deadline-ms", help="Time budget for the answer.")] = 30_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the final response as JSON.")] = False,
) -> None:
    """Ask the pipeline a question; the answer streams in, then its sources.

    Exit code 0 when answered, 1 on an error (deadline included), 3 when blocked.
    """

    settings = _settings(config)
    options: AskOptions = {
        "top_k": top_k,
        "alpha": alpha,
        "mode": mode,  # type: ignore[typeddict-item]  # validated by the contract
        "neighbours": neighbours,
        "document_ids": document_id or None,
        "route": route,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "deadline_ms": deadline_ms,
    }
    # Identity options only when given: a token (RAGSTREAM_AUTH__TOKEN) says who asks.
    if tenant:
        options["tenant"] = tenant
    if user:
        options["user"] = user
    if group:
        options["groups"] = group
    try:
        response, printed = asyncio.run(_ask(settings, question, options, stream=not as_json))
    except ValueError as exc:  # pydantic's ValidationError: an option out of range
        err.print(f"[red]invalid request[/]: {exc}")
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(response.model_dump_json())
    else:
        _print_answer_footer(response, printed)
    raise typer.Exit(_ASK_EXIT.get(response.status, 1))


async def _ask(settings: Settings, question: str, options: AskOptions, *, stream: bool) -> tuple[Any, bool]:
    """The final response, and whether any of its text was printed as it streamed."""
    from ragstream.client import AsyncClient

    async with AsyncClient(settings) as client:
        if not stream:
            return await client.ask(question, **options), False
        printed = False
        async for item in client.stream(question, **options):
            if isinstance(item, str):
                sys.stdout.write(item)  # plain write: answers hold [n] that rich would eat as markup
                sys.stdout.flush()
                printed = printed or bool(item)
            else:
                return item, printed
    raise RuntimeError("the client's stream ended without a final response")


def _print_answer_footer(response: Any, printed: bool) -> None:
    if not printed and response.answer:
        sys.stdout.write(response.answer)  # e.g. a refusal, which is not streamed
    if printed or response.answer:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if response.status != "ok":
        colour = "yellow" if response.status == "blocked" else "red"
        err.print(
            f"[{colour}]{response.status}[/]: {response.error_reason or 'no reason given'}", markup=True
        )
    if response.citations:
        console.print("\n[bold]Sources[/]")
        for c in response.citations:
            title = c.title or c.document_id
            console.print(f"  [{c.number}] {title}  ({c.document_id}, score {c.score:.3f})", markup=False)
    total_ms = response.latency_ms.get("total")
    parts = [
        f"status {response.status}",
        f"tokens {response.usage.prompt_tokens} prompt + {response.usage.completion_tokens} completion",
    ]
    if response.route:
        parts.append(f"route {response.route}")
    if response.model_id and response.model_id != response.route:
        parts.append(f"model {response.model_id}")
    if response.finish_reason and response.finish_reason not in ("stop", "length"):
        parts.append(f"finish {response.finish_reason}")
    if total_ms is not None:
        parts.append(f"{total_ms:.0f} ms")
    if "time_to_first_token" in response.latency_ms:
        parts.append(f"first token {response.latency_ms['time_to_first_token']:.0f} ms")
    parts.append(f"request {response.request_id}")
    console.print(" · ".join(parts), style="dim", markup=False, highlight=False)


async def _search(
    settings: Settings, query: str, tenant: str, groups: list[str], mode: str, top_k: int, alpha: float
) -> list[Any]:
    from ragstream.infra.embedder import TritonEmbedder
    from ragstream.infra.vectorstore import open_vector_store
    from ragstream.infra.vectorstore.base import SearchQuery

    store = open_vector_store(settings)
    await store.start()
    try:
        vector = None
        if mode != "keyword":
            embedder = TritonEmbedder(settings)
            await embedder.start()
            try:
                vector = tuple(float(x) for x in (await embedder.embed([query]))[0])
            finally:
                await embedder.close()
        return list(
            await store.search(
                SearchQuery(
                    tenant=tenant,
                    access_groups=tuple(groups),
                    text=query,
                    vector=vector,
                    top_k=top_k,
                    mode=mode,  # type: ignore[arg-type]
                    alpha=alpha,
                )
            )
        )
    finally:
        await store.close()


# -- plumbing ----------------------------------------------------------------------------
@app.command()
def worker(
    stage: Annotated[
        str,
        typer.Argument(
            help="Stage(s) to run: ingest, embed, index, retrieve, generate; comma-separate "
            "several to run them in one process (e.g. ingest,embed,index)."
        ),
    ],
    config: ConfigOpt = None,
) -> None:
    """Run stages as one Faust worker process (what `up` and docker-compose start)."""
    from ragstream.workers.main import run_worker

    settings = _settings(config)
    run_worker(settings, stage)


@app.command("serve-models")
def serve_models(config: ConfigOpt = None) -> None:
    """Run the local Triton server with the embedded models (production uses a Triton container)."""
    from ragstream.infra.model_server import model_server_command

    settings = _settings(config)
    argv, env = model_server_command(settings)
    os.execve(argv[0], argv, env)


@app.command()
def init(config: ConfigOpt = None) -> None:
    """Create the topics and the Iceberg namespace (idempotent)."""
    from ragstream.infra.iceberg import ensure_namespace
    from ragstream.stack import create_all_topics

    settings = _settings(config)
    created = create_all_topics(settings)
    ensure_namespace(settings)
    console.print(
        f"topics created: {', '.join(created) or 'none (all existed)'}; namespace {settings.iceberg.namespace} ready"
    )


@topics_app.command("create")
def topics_create(config: ConfigOpt = None) -> None:
    """Create every ragstream topic that is missing."""
    from ragstream.stack import create_all_topics

    settings = _settings(config)
    created = create_all_topics(settings)
    console.print(f"created: {', '.join(created) or 'none (all existed)'}")


@topics_app.command("list")
def topics_list(config: ConfigOpt = None) -> None:
    """Every topic: name, key, value types and purpose."""
    from ragstream.streams.topics import ALL_TOPICS

    settings = _settings(config)
    table = Table(title="ragstream topics")
    for col in ("topic", "key", "event types", "purpose"):
        table.add_column(col, overflow="fold")
    for t in ALL_TOPICS:
        types = ", ".join(v.model_fields["event_type"].default for v in t.value_types)
        table.add_row(t.full_name(settings.kafka.topic_prefix), t.key_doc, types, t.description)
    console.print(table)


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where to write the .json files.")],
) -> None:
    """Write a JSON Schema for every event, so non-Python producers can validate."""
    from ragstream.schemas.export import export_json_schemas

    written = export_json_schemas(directory)
    for p in written:
        console.print(str(p))


def main() -> None:
    try:
        app()
    except RagstreamError as exc:
        err.print(f"[red]error[/] ({type(exc).__name__}): {exc}")
        sys.exit(1)
