"""The little of MLflow's REST API traced-run needs, over ``transport`` (the
agent never imports mlflow): the experiment lookup, agent versions (LoggedModels)
and a trace's links to them."""

from __future__ import annotations

import urllib.parse
from typing import Any

from traced_run import transport
from traced_run.config import compat
from traced_run.config.settings import Settings
from traced_run.report import mask_url

DEFAULT_EXPERIMENT_ID = "0"
LINKS_SINCE = ">=3.13"
"""MLflow releases whose StartTraceV3 merges into a trace stored from OTLP and keeps its previews,
session and tokens: 3.6 answers 500 for a trace that exists (and would blank its previews)."""


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
          body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
    answer = transport.call_json(settings, method, path, workspace, body, timeout)
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


def server_version(settings: Settings, timeout: float) -> str:
    """The MLflow release the server says it runs (``/version``)."""
    answer = transport.call_json(settings, "GET", "/version", settings.workspace, timeout=timeout)
    shown = mask_url(transport.without_userinfo(settings.tracking_uri or ""))
    if answer.status is None:
        raise MlflowUnreachable(shown, answer.problem)
    if not answer.ok:
        raise MlflowHttpError(answer, shown + "/version")
    return answer.text(40)


def links_traces(version: str) -> bool:
    """Whether MLflow ``version`` can link a trace stored from OTLP to an agent version and a run."""
    return compat.allows(LINKS_SINCE, version)


def logged_model(settings: Settings, experiment_id: str, workspace: str | None, tags: dict[str, str],
                 name: str | None, timeout: float) -> str:
    """The id of the LoggedModel of ``experiment_id`` with all of ``tags`` (and ``name``, if
    given), created when there is none, as ``mlflow.genai.enable_git_model_versioning()`` does."""
    terms = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if name is not None:
        terms.append(f"name = '{name}'")
    found = _call(settings, "POST", "/api/2.0/mlflow/logged-models/search", workspace,
                  {"experiment_ids": [experiment_id], "filter": " AND ".join(terms), "max_results": 1},
                  timeout)
    models = found.get("models") or []
    if not models:
        body: dict[str, Any] = {"experiment_id": experiment_id,
                                "tags": [{"key": key, "value": value} for key, value in tags.items()]}
        if name is not None:
            body["name"] = name
        models = [_call(settings, "POST", "/api/2.0/mlflow/logged-models", workspace, body, timeout)
                  .get("model")]
    info = models[0].get("info") if isinstance(models[0], dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("model_id"), str):
        raise MlflowError("MLflow's answer about a LoggedModel names no model id")
    return transport.printable(info["model_id"])


def finish_trace(settings: Settings, workspace: str | None, info: dict[str, Any], timeout: float) -> None:
    """StartTraceV3 for a trace MLflow already stored from OTLP: it merges ``info`` (its
    ``trace_metadata``) into the stored trace and marks the trace's info final."""
    _call(settings, "POST", "/api/3.0/mlflow/traces", workspace, {"trace": {"trace_info": info}}, timeout)
