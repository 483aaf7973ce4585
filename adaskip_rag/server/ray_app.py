"""adaskip-rag on Ray Serve (the 'ray' extra): replicas of the server's app (one engine each, with its batched
scheduler) behind one Serve HTTP endpoint, the same OpenAI routes, health and metrics per replica, and every
answer's ``adaskip`` object naming the replica that served it. Replicas share what they learn through a profile
store they all reach (``chroma://HOST:PORT``). A request that also names its collection in the
``serve_multiplexed_model_id`` header goes, through Serve's model multiplexing, to a replica that served that
collection before, where its profile is warm.

Start it with ``adaskip-rag serve --ray --replicas N --profiles chroma://HOST:PORT`` (a local Ray instance), or
``serve run``/``serve deploy`` of a config whose ``import_path`` is ``adaskip_rag.server.ray_app:build`` (see
``examples/ray_serve.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from ..engine import AdaSkipEngine
from ..scheduler import ServingLimits
from ..stores import open_store
from .app import create_app

_engine: AdaSkipEngine | None = None  # this replica's, once its app is built


@dataclass(frozen=True)
class RayOptions:
    """One deployment: ``model``, ``profiles`` (a store URL every replica reaches; None: each replica's own default
    store), ``threads`` (torch threads per replica, also the CPUs Ray reserves for it), ``replicas``, or
    autoscaling between ``min_replicas`` and ``max_replicas`` at ``target_ongoing_requests`` per replica when
    ``max_replicas`` is set; the server's ``max_batch_size``, ``max_waiting`` and ``api_key``; ``compile_decode``:
    each replica compiles its decode step as it starts (see :class:`~adaskip_rag.AdaSkipEngine`)."""

    model: str = "default"
    profiles: str | None = None
    threads: int = 1
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    max_batch_size: int = 8
    max_waiting: int = 32
    api_key: str | None = None
    compile_decode: bool = False


def _replica_app(options: RayOptions) -> Any:
    """The server's app of one replica (run by Serve when the replica starts)."""
    global _engine
    torch.set_num_threads(options.threads)
    store = open_store(options.profiles) if options.profiles else None
    serving = ServingLimits(max_batch_size=options.max_batch_size)
    _engine = AdaSkipEngine.from_pretrained(
        options.model, store=store, serving=serving, compile_decode=options.compile_decode
    )
    replica = serve.get_replica_context().replica_id.unique_id
    app = create_app(_engine, api_key=options.api_key, max_waiting=options.max_waiting, replica=replica)

    @app.middleware("http")
    async def keep_collection(request: Any, call_next: Any) -> Any:
        """A request with the ``serve_multiplexed_model_id`` header (its collection) marks the collection as this
        replica's, so Serve sends the collection's next requests here, where its profile is warm."""
        collection = serve.get_multiplexed_model_id()
        if collection:
            await _hold(collection)
        return await call_next(request)

    return app


@serve.multiplexed(max_num_models_per_replica=256)
async def _hold(collection: str) -> str:
    """Serve's record that this replica serves ``collection`` (its profile loads with its first request here)."""
    return collection


class Replica:
    """A replica's own methods beside its app's routes (a module-level class: Serve calls it in the replica's
    process, where :func:`_replica_app` set the engine)."""

    def check_health(self) -> None:
        """Fails (and Serve restarts the replica) unless its engine answers a one-token request."""
        if _engine is None:
            raise RuntimeError("the replica's engine is not loaded")
        _engine.generate("ok", max_new_tokens=1, skip=False)


def deployment(options: RayOptions) -> serve.Application:
    """The Serve application of ``options``, to ``serve.run``."""

    scaling: dict[str, Any] = (
        {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
        if options.max_replicas
        else {"num_replicas": options.replicas}
    )

    def build_app() -> Any:  # Serve takes a function of no arguments as an app builder
        return _replica_app(options)

    ingress = serve.ingress(build_app)(Replica)
    return serve.deployment(
        name="adaskip",
        ray_actor_options={"num_cpus": options.threads},
        max_ongoing_requests=options.max_batch_size + options.max_waiting,
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=120,  # in-flight answers finish before a replica stops
        **scaling,
    )(ingress).bind()


def build(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder for config files: ``args`` are :class:`RayOptions` fields."""
    known = {f.name for f in dataclasses.fields(RayOptions)}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown adaskip-rag Ray options {sorted(unknown)}; known: {sorted(known)}")
    return deployment(RayOptions(**args))
