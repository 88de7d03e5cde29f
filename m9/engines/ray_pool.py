"""Ray helpers: join or start a Ray cluster, and count model loads across actors."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from m9.errors import EngineError, first_line
from m9.ui import quiet as m9quiet

log = logging.getLogger(__name__)

#: Name of the small actor that counts model loads, so a run can report how many happened.
LOAD_COUNTER = "m9-model-loads"

#: Object store for a local Ray: 2 GB holds many batches of image bytes and features, and leaves the
#: rest of a laptop's memory to the embed actors and their models.
LOCAL_OBJECT_STORE_BYTES = 2 * 1024**3


#: Seconds to wait for a Ray head's port before calling the address unreachable.
CONNECT_TIMEOUT_S = 5


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address == "auto" or "://" in address and not address.startswith("ray://"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"--ray-address {address}: expected `auto`, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise EngineError(f"cannot reach Ray at {address}: {exc.strerror or exc}; is the cluster running?") from None


@contextlib.contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray if this process has one; else join `address` or start a local Ray, and stop
    what was started on exit. `address` is a Ray address (`auto`, `host:port`, `ray://…`)."""
    import ray

    if ray.is_initialized():
        yield
        return
    m9quiet.configure()
    quiet: Mapping[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": True,
        "logging_level": m9quiet.ray_logging_level(),
    }
    try:
        if address:
            _check_reachable(address)
        with m9quiet.native_stderr_without(m9quiet.RAY_LEVEL_NOTICE):
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(
                    num_cpus=num_cpus or os.cpu_count(),
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    **quiet,
                )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(
            f"cannot reach Ray at {address}: {first_line(exc)}"
            if address
            else f"Ray could not start: {first_line(exc)}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def node_cpus() -> list[float]:
    """CPUs each alive node of the connected Ray cluster offers."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class LoadCounter:
        def __init__(self):
            self.loads = []

        def record(self, node: str, pid: int) -> None:
            self.loads.append((node, pid))

        def get(self) -> list:
            return self.loads

        def reset(self) -> None:
            self.loads = []

    return LoadCounter


def start_load_counter():
    """The actor that model-loading actors report to, emptied for this run.

    Reused when an earlier run in this driver left it alive (a handle kept by, e.g., an exception's
    traceback keeps it, and its name, taken): creating a second one of the same name would fail.
    Named actors live in the driver's own namespace, so another driver's runs never see this one.
    """
    import ray

    counter = _counter_class().options(name=LOAD_COUNTER, get_if_exists=True).remote()
    ray.get(counter.reset.remote())
    return counter


def record_model_load() -> None:
    """Tell the run's load counter, if there is one, that this process loaded the model."""
    import ray

    try:
        counter = ray.get_actor(LOAD_COUNTER)
    except ValueError:
        return
    ctx = ray.get_runtime_context()
    ray.get(counter.record.remote(ctx.get_node_id(), os.getpid()))
