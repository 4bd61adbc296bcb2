"""Run extraction shards on a Dask cluster.

``extract(..., executor=client)`` submits one ``extract_shard`` task per shard; each worker
loads the backbone once (cached per process), decodes and embeds its shard and writes it
straight into the store, so the store directory must be visible to every worker (one machine,
or a shared filesystem). The rows are the same as the local pipeline's.

    >>> with dask_client("local") as client:               # doctest: +SKIP
    ...     extract(tracks, "melstats", executor=client)
"""

from __future__ import annotations

import logging
import os

from .errors import EmbedkitError, require

INSTALL = "pip install 'embedkit[distributed]'"


def dask_client(
    address_or_local: str, n_workers: int | None = None, threads_per_worker: int = 1, processes: bool = True
):
    """A ``dask.distributed.Client``: ``"local"`` starts a LocalCluster on this machine (closed
    with the client), anything else is a scheduler address such as ``tcp://host:8786``.

    n_workers / threads_per_worker / processes apply to "local" only (default: one
    single-threaded worker process per CPU, so the backbones' own threads do not oversubscribe).
    Raises MissingDependencyError naming the pip command when dask is absent, EmbedkitError when
    the scheduler cannot be reached.
    """
    require("dask.distributed", INSTALL, "--dask")
    from distributed import Client

    if address_or_local.strip().lower() == "local":
        n = n_workers or max(1, os.cpu_count() or 1)
        try:
            return Client(
                n_workers=n,
                threads_per_worker=threads_per_worker,
                processes=processes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        except Exception as exc:
            raise EmbedkitError(f"cannot start a local Dask cluster ({type(exc).__name__}: {exc})") from None
    try:
        return Client(address_or_local, timeout="10s")
    except Exception as exc:  # OSError / TimeoutError / ValueError for a malformed address
        raise EmbedkitError(
            f"cannot reach Dask scheduler at {address_or_local!r} ({type(exc).__name__}: {exc})"
        ) from None
