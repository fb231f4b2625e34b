"""Start the operator: settings, JSON logs, and kopf with the handlers of
:mod:`embedjob.operator.main` (``embedjob operator`` or ``python -m embedjob.operator``)."""

from __future__ import annotations

import kopf

from embedjob.operator import kube, logs, pacing
from embedjob.operator import main as _handlers  # noqa: F401 (registers the kopf handlers)
from embedjob.operator.config import load_settings


def run_operator(namespaces: list[str] | None, config_path: str | None) -> int:
    """Run the operator until interrupted; cluster-wide unless namespaces are given."""
    settings = load_settings(config_path)
    logs.json_logs()
    names = list(namespaces or settings.namespaces)
    port = settings.liveness_port
    liveness = f"http://0.0.0.0:{port}/healthz" if port else None
    kube.connect()
    pacing.tune_interpreter()  # its full collection before the loop runs, not on it
    pacing.CollectorClock().start()
    kopf.run(
        standalone=True,
        clusterwide=not names,
        namespaces=names,
        liveness_endpoint=liveness,
        memo=kopf.Memo(settings=settings, namespaces=names),
    )
    return 0
