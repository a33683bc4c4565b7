"""MLflow as companies run it, each started only when a test asks for it and
shared by the session: behind HTTPS with a private CA (with and without a
client certificate, or a self-signed certificate), with authentication
(``mlflow server --app-name basic-auth``) and with workspaces
(``mlflow server --enable-workspaces``).

A test module imports the fixtures it uses from here (pytest finds fixtures in
the module's namespace).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import MlflowServer, start_mlflow

from support.tls import ConnectProxy, Pki, TlsProxy


@contextlib.contextmanager
def client_env(**values: str) -> Iterator[None]:
    """The MLflow client in this process reads its credentials and workspace from
    the environment at each request: set them for the block only."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def https_mlflow(mlflow_server: MlflowServer, pki: Pki) -> Iterator[TlsProxy]:
    """The session's MLflow at https://localhost:PORT, its certificate signed by the test CA."""
    proxy = TlsProxy(mlflow_server.url, pki.server_cert, pki.server_key)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def mtls_mlflow(mlflow_server: MlflowServer, pki: Pki) -> Iterator[TlsProxy]:
    """As ``https_mlflow``, and the handshake requires a client certificate from the test CA."""
    proxy = TlsProxy(mlflow_server.url, pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def self_signed_mlflow(mlflow_server: MlflowServer, pki: Pki) -> Iterator[TlsProxy]:
    """The session's MLflow behind a self-signed certificate (a development server)."""
    proxy = TlsProxy(mlflow_server.url, pki.self_signed_cert, pki.self_signed_key)
    yield proxy
    proxy.close()


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


ADMIN = ("admin", "admin-pw-" + uuid.uuid4().hex[:8])


@dataclass
class AuthMlflow:
    """``mlflow server --app-name basic-auth`` and the users a test made on it."""

    server: MlflowServer

    @property
    def url(self) -> str:
        return self.server.url

    def as_admin(self) -> contextlib.AbstractContextManager[None]:
        return client_env(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])

    def user(self, name: str | None = None) -> tuple[str, str]:
        """A new user with MLflow's default permission (READ on others' experiments)."""
        from mlflow.server import get_app_client

        name = name or f"u{uuid.uuid4().hex[:10]}"
        password = f"pw-{uuid.uuid4().hex}"
        with self.as_admin():
            get_app_client("basic-auth", tracking_uri=self.url).create_user(name, password)
        return name, password

    def experiment(self, name: str) -> str:
        """An experiment the admin owns: other users may read it, not write to it."""
        with self.as_admin():
            return str(self.server.client().create_experiment(name))

    def traces(self, experiment_id: str) -> list[Any]:
        with self.as_admin():
            return self.server.traces(experiment_id)

    def experiment_id(self, name: str) -> str | None:
        with self.as_admin():
            return self.server.experiment_id(name)


@pytest.fixture(scope="session")
def auth_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMlflow]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]}
    with start_mlflow(f"sqlite:///{root / 'mlflow.db'}", root, args=("--app-name", "basic-auth"),
                      env=env) as server:
        yield AuthMlflow(server)


@dataclass
class WorkspaceMlflow:
    """``mlflow server --enable-workspaces`` with the workspace ``team-a``."""

    server: MlflowServer
    workspace: str = "team-a"

    @property
    def url(self) -> str:
        return self.server.url

    def in_workspace(self, workspace: str | None = None) -> contextlib.AbstractContextManager[None]:
        return client_env(MLFLOW_WORKSPACE=workspace or self.workspace)

    def experiment_id(self, name: str, workspace: str | None = None) -> str | None:
        with self.in_workspace(workspace):
            return self.server.experiment_id(name)

    def traces(self, experiment_id: str, workspace: str | None = None) -> list[Any]:
        with self.in_workspace(workspace):
            return self.server.traces(experiment_id)


@pytest.fixture(scope="session")
def workspace_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkspaceMlflow]:
    root = tmp_path_factory.mktemp("mlflow-workspaces")
    with start_mlflow(f"sqlite:///{root / 'mlflow.db'}", root, args=("--enable-workspaces",)) as server:
        from mlflow.tracking import MlflowClient

        found = WorkspaceMlflow(server)
        MlflowClient(tracking_uri=server.url).create_workspace(found.workspace)
        yield found
