"""Triton client: an async wrapper over `tritonclient.grpc.aio` and a sync health probe.

Every tritonclient/grpc failure leaves this module as `DependencyUnavailable` (retry), so the
stages never see vendor exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ragstream.infra import telemetry
from ragstream.infra.settings import Settings
from ragstream.schemas.errors import DeadlineExceeded, DependencyUnavailable

if TYPE_CHECKING:
    import tritonclient.grpc.aio as grpcclient_aio

    from ragstream.infra.model_server import ModelGroup

__all__ = ["DeadlineExceeded", "TritonClient", "is_ready"]

logger = logging.getLogger(__name__)

_STREAM_CLOSE_TIMEOUT_S = 1.0
_TEXT_INPUT = "TEXT"
_EMBEDDING_OUTPUT = "EMBEDDING"


def _vendor_errors() -> tuple[type[BaseException], ...]:
    import grpc  # type: ignore[import-untyped]
    from tritonclient.utils import InferenceServerException

    return (InferenceServerException, grpc.RpcError, OSError)


class TritonClient:
    """Async client for the ragstream models on Triton (local pytriton or a remote server).

    The constructor does no I/O; the gRPC channel is opened in `start()` on the running loop.
    """

    def __init__(self, settings: Settings, *, url: str | None = None) -> None:
        self._url = url or settings.triton.grpc_url
        self._timeout_s = settings.triton.request_timeout_s
        self._embed_model = settings.triton.embed_model
        # Triton rejects requests larger than the model's max_batch_size; split below it.
        self._max_batch_size = settings.triton.max_batch_size
        self._client: grpcclient_aio.InferenceServerClient | None = None

    @property
    def url(self) -> str:
        return self._url

    async def start(self) -> None:
        """Open the gRPC channel (no request is sent; use `wait_ready` to check the server).

        Raises:
            DependencyUnavailable: the client library is missing or the URL is unusable.
        """
        if self._client is not None:
            return
        try:
            import tritonclient.grpc.aio as grpcclient_aio
        except ImportError as exc:
            raise DependencyUnavailable("tritonclient is missing: pip install 'tritonclient[grpc]'") from exc
        try:
            self._client = grpcclient_aio.InferenceServerClient(url=self._url)
        except _vendor_errors() as exc:
            raise DependencyUnavailable(f"cannot open Triton channel to {self._url}: {exc}") from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> TritonClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _require(self) -> grpcclient_aio.InferenceServerClient:
        if self._client is None:
            raise RuntimeError("TritonClient.start() was not awaited")
        return self._client

    async def wait_ready(self, models: Sequence[str], timeout_s: float) -> None:
        """Wait until the server is live and every model in `models` reports ready.

        The server answers ready before its models load, so each model is polled.

        Raises:
            DependencyUnavailable: not ready within `timeout_s`; the message names what is missing.
        """
        client = self._require()
        deadline = time.monotonic() + timeout_s
        pending = list(models)
        last_error = ""
        while True:
            still: list[str] = []
            for model in pending:
                try:
                    ready = bool(await client.is_model_ready(model, client_timeout=1.0))
                except _vendor_errors() as exc:
                    ready, last_error = False, str(exc)
                if not ready:
                    still.append(model)
            pending = still
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise DependencyUnavailable(
                    f"Triton at {self._url}: models {pending} not ready after {timeout_s:.0f} s"
                    + (f" ({last_error})" if last_error else ""),
                    retry_after_s=1.0,
                )
            await asyncio.sleep(0.2)

    async def infer_embeddings(
        self, texts: Sequence[str], *, model: str | None = None
    ) -> npt.NDArray[np.float32]:
        """Embed texts with the embedding model (`model`, default `triton.embed_model`);
        float32 (len(texts), dim), unit length.

        Requests larger than the model's max batch size are split and sent concurrently. An empty
        `texts` gives a (0, 0) array without a request.

        Raises:
            DependencyUnavailable: Triton did not answer, timed out or returned an error.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        step = self._max_batch_size
        parts = [texts[i : i + step] for i in range(0, len(texts), step)]
        results = await asyncio.gather(*(self._infer_batch(part, model) for part in parts))
        return results[0] if len(results) == 1 else np.concatenate(results, axis=0)

    async def _infer_batch(self, texts: Sequence[str], model: str | None = None) -> npt.NDArray[np.float32]:
        import tritonclient.grpc.aio as grpcclient_aio

        client = self._require()
        model = model or self._embed_model
        data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
        text_input = grpcclient_aio.InferInput(_TEXT_INPUT, list(data.shape), "BYTES")
        text_input.set_data_from_numpy(data)
        output = grpcclient_aio.InferRequestedOutput(_EMBEDDING_OUTPUT)
        started = time.perf_counter()
        outcome = "error"
        try:
            with telemetry.child_span("triton.infer", model=model, batch=len(texts)):
                result: Any = await client.infer(
                    model,
                    [text_input],
                    outputs=[output],
                    client_timeout=self._timeout_s,
                )
            outcome = "ok"
        except _vendor_errors() as exc:
            raise DependencyUnavailable(f"Triton embedding request to {self._url} failed: {exc}") from exc
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            telemetry.TRITON_REQUEST_SECONDS.labels(model, outcome).observe(time.perf_counter() - started)
        vectors = result.as_numpy(_EMBEDDING_OUTPUT)
        if vectors is None or vectors.shape[0] != len(texts):
            raise DependencyUnavailable(
                f"Triton model {model} returned no or a mis-sized {_EMBEDDING_OUTPUT}"
            )
        return np.asarray(vectors, dtype=np.float32)

    async def stream_infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        *,
        request_id: str,
        timeout_s: float,
    ) -> AsyncGenerator[tuple[dict[str, npt.NDArray[Any]], bool], None]:
        """Send one request to a decoupled model; yield `(outputs, is_final)` per response.

        Asks for Triton's empty final response, so the end of the stream is explicit: the last
        item has `is_final=True` (and usually no outputs). Stopping the iteration early
        cancels the gRPC stream.

        The request is built from the public protobuf messages and sent on the aio client's
        stub, because `stream_infer` of tritonclient.grpc.aio 2.73 cannot set the reserved
        `triton_enable_empty_final_response` parameter.

        Raises:
            DeadlineExceeded: the stream ran past `timeout_s`.
            DependencyUnavailable: Triton failed or answered with an error.
        """
        import grpc
        from tritonclient.grpc import InferResult, service_pb2
        from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

        client = self._require()
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        for name, array in inputs.items():
            tensor = request.inputs.add()
            tensor.name = name
            tensor.datatype = np_to_triton_dtype(array.dtype)
            tensor.shape.extend(array.shape)
            if tensor.datatype == "BYTES":
                serialized = serialize_byte_tensor(array)
                request.raw_input_contents.append(serialized.item() if serialized.size > 0 else b"")
            else:
                request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        request.parameters["triton_enable_empty_final_response"].bool_param = True

        async def requests() -> AsyncGenerator[Any, None]:
            yield request

        try:
            call = client._client_stub.ModelStreamInfer(requests(), timeout=timeout_s)
        except _vendor_errors() as exc:
            raise DependencyUnavailable(f"cannot open a Triton stream to {self._url}: {exc}") from exc
        finished = False
        try:
            async for response in call:
                if response.error_message:
                    raise DependencyUnavailable(f"Triton model {model} failed: {response.error_message}")
                infer_response = response.infer_response
                params = infer_response.parameters
                final = "triton_final_response" in params and params["triton_final_response"].bool_param
                result = InferResult(infer_response)
                outputs = {output.name: result.as_numpy(output.name) for output in infer_response.outputs}
                finished = final
                yield outputs, final
                if final:
                    return
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"Triton model {model} did not finish within {timeout_s} s") from exc
            raise DependencyUnavailable(f"Triton stream to {model} at {self._url} failed: {exc}") from exc
        finally:
            if finished:
                # Let the server end the stream itself (status OK). Cancelling right after the
                # final response sometimes left tritonserver 2.51's stream handler unfinished,
                # so its model never unloaded and every stop waited out the exit timeout.
                try:
                    await asyncio.wait_for(call.code(), timeout=_STREAM_CLOSE_TIMEOUT_S)
                except (TimeoutError, grpc.RpcError):
                    call.cancel()
            else:
                call.cancel()  # stopping early: the server stops generating too
        raise DependencyUnavailable(f"Triton stream to {model} closed before its final response")


def is_ready(
    settings: Settings,
    models: Sequence[str] | None = None,
    timeout_s: float = 2.0,
    group: ModelGroup = "all",
) -> dict[str, bool]:
    """Health probe for `ragstream status`: `{"server": live, <model>: ready, ...}`.

    Never raises for an unreachable server; that reads as all False. `models` defaults to the
    models the local model server registers.
    """
    if models is None:
        from ragstream.infra.model_server import model_specs

        models = [spec.name for spec in model_specs(settings, group)]
    status = {"server": False} | {model: False for model in models}
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        return status
    vendor_errors = _vendor_errors()
    try:
        url = settings.generation_grpc_url if group == "generate" else settings.triton.grpc_url
        client = grpcclient.InferenceServerClient(url=url)
    except vendor_errors:
        return status
    try:
        status["server"] = bool(client.is_server_live(client_timeout=timeout_s))
        if status["server"]:
            for model in models:
                status[model] = bool(client.is_model_ready(model, client_timeout=timeout_s))
    except vendor_errors as exc:
        logger.debug("Triton at %s not ready: %s", settings.triton.grpc_url, exc)
    finally:
        client.close()
    return status
