"""kopf handlers: thin. Each SpeechTuningStudy gets a daemon that runs a StudyRunner.

Deletion: kopf puts its finalizer on every study while the operator serves it.
On delete the daemon is stopped (the trials' Jobs are left to the garbage
collector: study -> Trials -> Jobs -> pods), then ``delete_study`` removes the
Optuna study only if spec.storage.deleteOnStudyDeletion is true, then the
finalizer goes and the object with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf
import optuna

from speechtune import spec
from speechtune.k8s import dispatch, metrics, studyspec
from speechtune.k8s.api import GROUP, VERSION, Api
from speechtune.k8s.runner import StorageProblem, StudyRunner, optuna_study_name, storage_url

PLURAL = "speechtuningstudies"
METRICS_PORT_ENV = "SPEECHTUNE_METRICS_PORT"
METRICS_ADDRESS_ENV = "SPEECHTUNE_METRICS_ADDRESS"  # loopback unless told (the chart says 0.0.0.0)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = "speechtune.io/finalizer"
    # Serve the CRDs present at start in the namespaces named on the command line: no cluster-wide
    # watch of CRDs and namespaces, so the chart's RBAC needs nothing beyond what studies use.
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # our Events are posted on purpose; kopf's info logs would drown them
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    memo.api = Api.from_environment()
    memo.dispatch = None
    if os.environ.get(dispatch.PORT_ENV):
        memo.dispatch = dispatch.Dispatch(os.environ.get(dispatch.URL_ENV) or
                                          f"http://127.0.0.1:{os.environ[dispatch.PORT_ENV]}")
        await memo.dispatch.start(int(os.environ[dispatch.PORT_ENV]), os.environ.get(dispatch.ADDRESS_ENV, "127.0.0.1"))
    port = os.environ.get(METRICS_PORT_ENV)
    if port:
        metrics.serve(int(port), os.environ.get(METRICS_ADDRESS_ENV, "127.0.0.1"))
        logger.info("Prometheus metrics on :%s/metrics", port)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials as our own client (speechtune.k8s.api), without the kubernetes library."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.dispatch is not None:
        await memo.dispatch.close()
    await memo.api.close()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def run_study(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """The study's whole life; returns only when the object is deleted or the operator stops."""
    def post(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    await StudyRunner(memo.api, body, post, memo.dispatch).run(stopped)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_study(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Keep the Optuna study unless spec.storage.deleteOnStudyDeletion says otherwise."""
    try:
        study, options = studyspec.parse(body)
        if not options.delete_on_study_deletion:
            return
        url = await storage_url(memo.api, meta["namespace"], study.storage)
    except (spec.SpecError, StorageProblem) as error:
        logger.warning("not deleting the Optuna study: %s", error)
        return
    name = optuna_study_name(meta["namespace"], meta["name"], meta["uid"])
    try:
        await asyncio.to_thread(optuna.delete_study, study_name=name, storage=url)
        logger.info("deleted Optuna study %s", name)
    except KeyError:
        pass  # never created, or already gone
