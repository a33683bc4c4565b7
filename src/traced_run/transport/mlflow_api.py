"""The little of MLflow's REST API traced-run needs, over ``transport`` (the
agent never imports mlflow): the experiment lookup."""

from __future__ import annotations

import urllib.parse
from typing import Any

from traced_run import transport
from traced_run.config.settings import Settings
from traced_run.report import mask_url

DEFAULT_EXPERIMENT_ID = "0"


class MlflowError(Exception):
    """MLflow could not be asked, or said no; ``str()`` is safe to print."""

    retry_after: float | None = None
    """Seconds MLflow asked to wait before it is asked again (a 429 or 503's ``Retry-After``)."""


class ExperimentRefused(MlflowError):
    """MLflow refuses the experiment a batch names (deleted, or in a workspace it does not
    know): sending the batch again cannot help until someone changes that."""

    def __init__(self, message: str, wrong_workspace: bool = False) -> None:
        self.wrong_workspace = wrong_workspace
        super().__init__(message)


class MlflowUnreachable(MlflowError):
    def __init__(self, url: str, reason: str) -> None:
        self.reason = reason
        """Why there was no answer; the exit line names the endpoint already and shows only this."""
        super().__init__(f"cannot reach MLflow at {url}: {reason}")


class MlflowHttpError(MlflowError):
    def __init__(self, answer: transport.Answer, url: str) -> None:
        assert answer.status is not None
        self.status = answer.status
        self.error_code = answer.error_code()
        if 300 <= self.status < 400 or self.status in (401, 403):
            # The problem says what it means and what fixes it (where a redirect pointed, which
            # credentials).
            super().__init__(f"{answer.problem} (for {url})")
            return
        self.retry_after = answer.retry_after
        super().__init__(f"MLflow answered {self.status} {self.error_code} for {url}".strip() + answer.asked)


def _call(settings: Settings, method: str, path: str, workspace: str | None,
          body: dict[str, Any] | None = None) -> Any:
    answer = transport.call_json(settings, method, path, workspace, body)
    url = mask_url(transport.without_userinfo((settings.tracking_uri or "") + path.partition("?")[0]))
    if answer.status is None:
        raise MlflowUnreachable(mask_url(transport.without_userinfo(settings.tracking_uri or "")),
                                answer.problem)
    if answer.wrong_workspace:
        # Every route answers so, the experiment lookup with RESOURCE_DOES_NOT_EXIST: never a
        # reason to create the experiment, nor to fall back to the default workspace.
        raise ExperimentRefused(answer.problem, wrong_workspace=True)
    if not answer.ok:
        raise MlflowHttpError(answer, url)
    found = answer.json()
    if not isinstance(found, dict):
        raise MlflowError(f"MLflow answered {url} with something that is not a JSON object")
    return found


def experiment_id(settings: Settings, name: str, workspace: str | None) -> str:
    """The id of experiment ``name`` in ``workspace`` (None: the server's default),
    created when missing (a concurrent creation is looked up again)."""
    if not settings.tracking_uri:
        raise MlflowError(transport.NO_TRACKING_URI)
    for _ in range(2):
        try:
            found = _call(settings, "GET", "/api/2.0/mlflow/experiments/get-by-name?"
                          + urllib.parse.urlencode({"experiment_name": name}), workspace)
        except MlflowHttpError as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:
            experiment = found.get("experiment")
            if not isinstance(experiment, dict) or "experiment_id" not in experiment:
                raise MlflowError(f"MLflow's answer for experiment {name!r} names no experiment id")
            if experiment.get("lifecycle_stage") == "deleted":
                raise ExperimentRefused(f"experiment {name!r} is deleted in MLflow: restore it or use "
                                        "another")
            return transport.printable(str(experiment["experiment_id"]))
        try:
            created = _call(settings, "POST", "/api/2.0/mlflow/experiments/create", workspace,
                            {"name": name})
        except MlflowHttpError as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        else:
            if "experiment_id" not in created:
                raise MlflowError(f"MLflow's answer to creating experiment {name!r} names no experiment id")
            return transport.printable(str(created["experiment_id"]))
    raise MlflowError(f"experiment {name!r} could neither be found nor created")
