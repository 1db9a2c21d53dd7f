"""Connecting to Ray: an existing cluster (``--address`` / ``RAY_ADDRESS``) or a local one.

A local cluster is started on 127.0.0.1 with usage statistics off and no dashboard; it lives as
long as the job (``ray.init`` shuts it down at exit).
"""

from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own bar
    ctx.print_on_execution_start = False
