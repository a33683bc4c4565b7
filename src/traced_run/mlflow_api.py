"""The little of MLflow's REST API traced-run needs, over the standard library
(the agent never imports mlflow): auth headers and the experiment lookup."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from traced_run.report import mask_url
from traced_run.settings import Settings

DEFAULT_EXPERIMENT_ID = "0"


class MlflowError(Exception):
    """MLflow could not be asked, or said no; ``str()`` is safe to print."""


def auth_headers(settings: Settings) -> dict[str, str]:
    """Basic auth from user name and password, else Bearer from the token, as
    MLflow's own client builds them."""
    if settings.username:
        pair = f"{settings.username}:{settings.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    if settings.token:
        return {"Authorization": f"Bearer {settings.token}"}
    return {}


def _call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    assert settings.tracking_uri is not None
    url = settings.tracking_uri + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=auth_headers(settings))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read() or b"{}")
        except ValueError:
            detail = {}
        raise MlflowHttpError(error.code, str(detail.get("error_code", "")), mask_url(url)) from None
    except (OSError, ValueError) as error:
        raise MlflowUnreachable(mask_url(settings.tracking_uri), getattr(error, "reason", error)) from None


class MlflowUnreachable(MlflowError):
    def __init__(self, url: str, reason: object) -> None:
        self.reason = reason
        """The network error; the exit line names the endpoint already and shows only this."""
        super().__init__(f"cannot reach MLflow at {url}: {reason}")


class MlflowHttpError(MlflowError):
    def __init__(self, status: int, error_code: str, url: str) -> None:
        self.status = status
        self.error_code = error_code
        hint = {401: " (check MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN)", 403: " (no permission)"}
        super().__init__(f"MLflow answered {status} {error_code} for {url}{hint.get(status, '')}".strip())


def experiment_id(settings: Settings, name: str) -> str:
    """The id of experiment ``name``, created when missing (a concurrent
    creation is looked up again)."""
    if not settings.tracking_uri:
        raise MlflowError("experiment_name needs tracking_uri to look the experiment up")
    for _ in range(2):
        try:
            found = _call(settings, "GET", "/api/2.0/mlflow/experiments/get-by-name?"
                          + urllib.parse.urlencode({"experiment_name": name}))
        except MlflowHttpError as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:
            experiment = found["experiment"]
            if experiment.get("lifecycle_stage") == "deleted":
                raise MlflowError(f"experiment {name!r} is deleted in MLflow: restore it or use another")
            return str(experiment["experiment_id"])
        try:
            created = _call(settings, "POST", "/api/2.0/mlflow/experiments/create", {"name": name})
        except MlflowHttpError as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        else:
            return str(created["experiment_id"])
    raise MlflowError(f"experiment {name!r} could neither be found nor created")
