"""`tokenrecycle serve --replicas N`: the server's replicas on Ray Serve, started and stopped here.

Without `--ray-address`, a local Ray instance on 127.0.0.1 with this machine's cores, shut down
(with every process it started) when the command ends; with it, the application joins that
cluster and only the application is deleted at the end. Before anything starts, the model is
prepared once here (`prepare`: its conversion, the C++ build, tuning for a replica's threads) so
that replicas only load it. Ray is an optional extra: without it this says what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading
from typing import Callable

from ..engine import Engine
from ..errors import InvalidOptionError, TokenRecycleError
from .drafting import Drafting
from .run import bind
from .settings import ReplicaSettings, ServerSettings

RAY_MISSING = "--replicas and --ray-address need Ray Serve, an optional extra: pip install 'tokenrecycle[ray]' (make install installs it)"
SERVE_STOP_WAIT_S = 30.0  # replicas drain for up to 10 s (replicas.py), then their engines stop
SIGNAL_POLL_S = 1.0  # the main thread wakes this often, so a signal is handled promptly


class ReplicaStartError(TokenRecycleError):
    """The replicas could not start: the first line of why."""


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise InvalidOptionError(RAY_MISSING)


def cores_here() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def serve_on_ray(load_engine: Callable[[], Engine], settings: ServerSettings, drafting: Drafting, host: str, port: int,
                 replicas: ReplicaSettings, max_slots: int, max_waiting: int, prepare: Callable[[int], None] | None = None,
                 on_stop: Callable[[Engine], None] | None = None, on_interval: Callable[[Engine], None] | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C (exit 0); one line on stderr says where, with how many
    replicas and threads. `prepare(threads)` runs first, here, when Ray is local."""
    require_ray()
    port = _free_port(host, port) if replicas.address is None else port
    local = replicas.address is None
    threads = replicas.threads_per_replica(cores_here()) if local else None
    if local and prepare is not None:
        prepare(threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would report usage over the network
    if local:  # a one-node cluster: Ray binds every process to the loopback address, not the LAN's
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from .replicas import APP_NAME, MODEL, ReplicaSpec, application

    if local:
        ray.init(address="local", num_cpus=cores_here(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)  # fmt: skip
    else:
        ray.init(address=replicas.address, logging_level=logging.WARNING, log_to_driver=False)
        threads = replicas.threads_per_replica(_cluster_cores(ray))
    _quiet_ray_logs()
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        spec = ReplicaSpec(load_engine, settings, drafting, threads, on_stop, on_interval)
        app = application(spec, replicas.replicas, replicas.autoscaling_config(), max_waiting, max_slots)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        except Exception as exc:  # a replica's constructor raised (its load), retried and failed
            raise ReplicaStartError(f"the replicas could not start: {_last_line(exc)}") from None
        described = serve.get_deployment_handle(MODEL, APP_NAME).describe.remote().result()
        print(_ready_line(described, host, port, replicas, threads, ray.__version__, replicas.address), file=sys.stderr, flush=True)
        _wait_for_signal()
    finally:
        _stop(serve, ray, local, APP_NAME)
    return 0


def _free_port(host: str, port: int) -> int:
    """The port Ray's proxy will listen on, checked free now (0: any free one), so that a port in
    use is one line before anything starts."""
    sock = bind(host, port)
    chosen = sock.getsockname()[1]
    sock.close()
    return chosen


def _cluster_cores(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def _ready_line(described: dict, host: str, port: int, replicas: ReplicaSettings, threads: int, version: str, address: str | None) -> str:
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    count = f"{replicas.lowest}-{replicas.most} replicas (autoscaled, {replicas.replicas} first)" if replicas.autoscaling else _plural(replicas.replicas, "replica")
    cluster = f"Ray {version} at {address}" if address else f"Ray {version}, local"
    return (f"tokenrecycle: serving {described['model']} on {where}/v1 · {count} x {_plural(threads, 'thread')} on {cluster} · "
            f"{described['summary']} · batching {described['batching']}")  # fmt: skip


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(SIGNAL_POLL_S):
        pass


def _stop(serve, ray, local: bool, app_name: str) -> None:
    """Local: Serve and the Ray instance, every process they started. Joined: only this
    application (the cluster and its other applications go on). Serve's graceful stop is given
    a bounded time: a signal sent to the whole process group (systemd's default) has killed
    Ray's own processes too, and Serve would wait for them forever."""
    stopping = threading.Thread(target=serve.shutdown if local else lambda: serve.delete(app_name), daemon=True)
    stopping.start()
    stopping.join(SERVE_STOP_WAIT_S)
    ray.shutdown()


def _quiet_ray_logs() -> None:
    """Ray's own INFO lines (cluster started, application deployed) would bury the ready line."""
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _last_line(exc: BaseException) -> str:
    """The most telling line of a Ray error: the innermost exception's own message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Exception:" in line:
            return line
    return lines[-1] if lines else type(exc).__name__


__all__ = ["ReplicaStartError", "require_ray", "serve_on_ray"]
