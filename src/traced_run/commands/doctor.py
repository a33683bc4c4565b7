"""``traced-run doctor``: why do traces not show up? One command, one line per check.

Each check prints ``OK|WARN|FAIL <check>: <what> [— what to do]`` on stdout
(``--json``: one JSON document instead); exit 0 when nothing failed, 1 otherwise.

Bounded: every network step has a short timeout (``STEP_TIMEOUT``) and the
checks that talk to MLflow run on a daemon thread the main thread waits for at
most ``TOTAL_BOUND`` seconds, so a server that hangs, or a host name whose DNS
lookup hangs (no request timeout covers it), cannot hold the doctor. When
MLflow cannot be reached, the checks that need it are not run.

Side effects, on purpose few: doctor never creates an experiment (a missing
one is reported as what the first traced run will do); its end-to-end proof
is one small trace, tagged ``traced_run.doctor``, in the configured
experiment, or in the Default experiment (0) while the configured one does
not exist yet. ``--no-trace`` skips the proof.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from traced_run import report
from traced_run.config import compat
from traced_run.config.settings import SPECS, Settings, default_of
from traced_run.config.sources import Loaded, load, shown
from traced_run.delivery.spool import Spool, SpoolRefused, Target
from traced_run.report import age, counted, mask_url
from traced_run.transport import (
    CREDENTIALS_FIX,
    NO_TRACKING_URI,
    Answer,
    mlflow_api,
    otlp_answer,
    otlp_headers,
    printable,
    proxy_for,
    request,
    rest_headers,
    who,
)

STEP_TIMEOUT = 2.0
"""Seconds one network request may take."""
TOTAL_BOUND = 12.0
"""Seconds all MLflow checks together may take (a proof read-back polls within it)."""
PROOF_WAIT = 6.0
"""Seconds the proof trace may take to be readable once MLflow took it."""
SPOOL_BOUND = 5.0
"""Seconds reading the spool may take."""
CHILD_TIMEOUT = 10.0
"""Seconds the bootstrap check's child interpreter may take."""
DOCTOR_TAG = "traced_run.doctor"

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    status: str
    check: str
    what: str
    hint: str = ""

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.what}" + (f" — {self.hint}" if self.hint else "")


@dataclass
class Findings:
    """What the checks found; the MLflow thread appends while the main thread waits."""

    checks: list[Check] = field(default_factory=list)
    trace: dict[str, Any] = field(default_factory=dict)

    def add(self, status: str, check: str, what: str, hint: str = "") -> Check:
        # Server answers are quoted in `what`: escaped, they cannot move the terminal's cursor.
        found = Check(status, check, printable(" ".join(what.split())), printable(hint))
        self.checks.append(found)
        return found


# -- settings and versions -------------------------------------------------------------


def check_settings(loaded: Loaded, found: Findings) -> None:
    """One line per setting that is not at its default, with where it came from."""
    settings = loaded.settings
    changed = [name for name in SPECS
               if loaded.sources[name] != "default" or getattr(settings, name) != default_of(name)]
    for name in changed:
        value = shown(name, getattr(settings, name))
        found.add(OK, f"setting {name}", f"{value} from {loaded.sources[name]}")
    if not settings.enabled:
        found.add(WARN, "settings", f"tracing is turned off ({loaded.sources['enabled']})",
                  "unset it (TRACED_RUN_ENABLED / OTEL_SDK_DISABLED / --disable) to trace")
    elif not settings.traces_endpoint:
        what, _, hint = NO_TRACKING_URI.partition(": ")
        found.add(FAIL, "settings", what, hint)
    else:
        found.add(OK, "settings", f"valid; {len(changed)} set, the rest at their defaults "
                  "(`traced-run config` shows all)")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(found: Findings) -> dict[str, str | None]:
    """Installed versions, and whether they are ones traced-run works with."""
    versions: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    pydantic_ai = _version("pydantic-ai-slim") or _version("pydantic-ai")
    versions["pydantic-ai"] = pydantic_ai
    for name in ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http",
                 "opentelemetry-exporter-otlp-proto-common", "openinference-instrumentation-pydantic-ai"):
        versions[name] = _version(name)
    listed = ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())
    problems: list[tuple[str, str, str]] = []
    if pydantic_ai is None:
        problems.append((WARN, "pydantic-ai is not installed in this environment: nothing to trace",
                         "install traced-run in the app's own environment"))
    problems += [(FAIL, problem, "install a supported release: until then the app runs untraced")
                 for problem in compat.problems()]
    otel = {k: v for k, v in versions.items() if k.startswith("opentelemetry-")}
    missing = [k for k, v in {**otel, "openinference-instrumentation-pydantic-ai":
                              versions["openinference-instrumentation-pydantic-ai"]}.items() if v is None]
    if missing:
        problems.append((FAIL, f"missing: {', '.join(missing)}", "pip install --force-reinstall traced-run"))
    elif len({v for v in otel.values()}) > 1:
        # The SDK, API and exporters are released together; mixed releases break at import.
        problems.append((FAIL, "OpenTelemetry packages of different releases",
                         "pip install -U opentelemetry-api opentelemetry-sdk "
                         "opentelemetry-exporter-otlp-proto-http"))
    if not problems:
        found.add(OK, "versions", f"{listed}; they fit")
    for status, what, hint in problems:
        found.add(status, "versions", f"{listed}: {what}", hint)
    return versions


# -- MLflow over the network ---------------------------------------------------------------


def _bad_host(answer: Answer) -> bool:
    return answer.status == 403 and b"Invalid Host header" in answer.body


def _detail(answer: Answer) -> str:
    """MLflow's error code, or the start of the body, for a FAIL line; what a redirect or an
    answer that is not MLflow's is, as its problem says it."""
    if answer.status is not None and answer.status < 400 and answer.problem:
        return answer.problem
    text = answer.error_code() or answer.text(120)
    return f"HTTP {answer.status}" + (f" {text}" if text else "")


def _problem_and_fix(problem: str) -> tuple[str, str]:
    """A transport problem that carries its fix (certificates, credentials, workspace)
    as a FAIL line's what and what-to-do."""
    what, sep, fix = problem.partition("; ")
    return (what, fix) if sep else (problem, "")


class _Asking:
    """What every MLflow check shares: the request, and the answers that name their own fix
    (no answer, credentials refused, a missing workspace)."""

    def __init__(self, settings: Settings, found: Findings, proof: bool) -> None:
        self.settings = settings
        self.found = found
        self.proof = proof
        self.base = settings.tracking_uri or ""
        self.shown = mask_url(self.base)
        self.headers = rest_headers(settings, settings.workspace)
        self.experiment_id: str | None = None

    def request(self, url: str, *, method: str = "GET", data: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        return request(self.settings, url, method=method, data=data, headers=headers, timeout=STEP_TIMEOUT)

    def get(self, path: str) -> Answer:
        return self.request(self.base + path, headers=self.headers)

    def failed(self, check: str, answer: Answer, hint: str) -> None:
        """A request that got no answer: a certificate or TLS problem carries its own fix."""
        what, fix = _problem_and_fix(answer.problem)
        self.found.add(FAIL, check, f"{self.shown}: {what}", fix or hint)

    def auth_failed(self, answer: Answer, where: str) -> bool:
        """The first check that meets a 401/403 names the credentials as the fix."""
        if answer.status == 401:
            self.found.add(FAIL, "auth", f"{where}: MLflow did not accept the credentials "
                           f"({who(self.settings)}): HTTP 401", CREDENTIALS_FIX)
            return True
        if answer.status == 403 and not _bad_host(answer):
            self.found.add(FAIL, "auth", f"{where}: {who(self.settings)} has no permission (HTTP 403 "
                           f"{answer.text(60)})",
                           "ask an MLflow admin for EDIT permission on the experiment, "
                           "or set other credentials (MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)")
            return True
        return False

    def workspace_missing(self, answer: Answer) -> bool:
        if answer.missing_workspace:
            self.found.add(FAIL, "workspace", f"{self.settings.workspace!r} does not exist on {self.shown}",
                           "create it (mlflow.create_workspace) or set MLFLOW_WORKSPACE to an existing "
                           "workspace")
            return True
        if answer.workspaces_off:
            self.found.add(FAIL, "workspace", f"MLFLOW_WORKSPACE={self.settings.workspace} is set, but "
                           f"{self.shown} has no workspaces (HTTP {answer.status} FEATURE_DISABLED)",
                           "unset MLFLOW_WORKSPACE, or start mlflow server with --enable-workspaces")
            return True
        return False


class _ServerChecks(_Asking):
    """How requests leave, and whether the server is an MLflow that takes this host and workspace."""

    def check_transport(self) -> None:
        """How requests leave: through a proxy, and whether certificates are checked."""
        url = self.base or self.settings.traces_endpoint or ""
        proxy = proxy_for(url)
        if proxy:
            scheme = urllib.parse.urlsplit(url).scheme.upper()
            self.found.add(OK, "proxy", f"requests to {mask_url(url)} go through {proxy} "
                           f"({scheme}_PROXY; NO_PROXY does not cover the host)")
        if self.settings.insecure_tls:
            self.found.add(WARN, "tls", "certificates are not verified (MLFLOW_TRACKING_INSECURE_TLS=true): "
                           "anyone on the way can read and change traces",
                           "set MLFLOW_TRACKING_SERVER_CERT_PATH to the server's CA certificate instead")

    def reachable(self) -> bool:
        answer = self.request(self.base + "/health")
        if answer.status is None:
            self.failed("mlflow reachable", answer,
                        "start MLflow (`traced-run mlflow` for a local one) or fix MLFLOW_TRACKING_URI")
            return False
        if answer.status != 200:
            self.found.add(FAIL, "mlflow reachable", f"{self.shown}/health answered {_detail(answer)}",
                           "is MLFLOW_TRACKING_URI an MLflow tracking server?")
            return False
        self.found.add(OK, "mlflow reachable", f"{self.shown}/health answered in {answer.ms:.0f} ms")
        return True

    def version_and_host(self) -> bool:
        # /health skips MLflow's Host header check; /version does not.
        answer = self.get("/version")
        if _bad_host(answer):
            host = urllib.parse.urlsplit(self.base).netloc
            self.found.add(FAIL, "host header", f"MLflow refuses the Host header {host!r} "
                           "(403 Invalid Host header)",
                           f"start mlflow server with --allowed-hosts {host} (or a pattern covering it)")
            return False
        if self.auth_failed(answer, "/version") or self.workspace_missing(answer):
            return False
        if answer.status is None:
            self.failed("mlflow version", answer, "MLflow stopped answering; try again")
            return False
        if answer.status != 200:
            self.found.add(FAIL, "mlflow version", f"/version answered {_detail(answer)}",
                           "is MLFLOW_TRACKING_URI an MLflow tracking server?")
            return False
        self.found.add(OK, "host header", "accepted")
        version = answer.text(40)
        supported = compat.ranges().get(compat.MLFLOW, "")
        if supported and not compat.allows(supported, version):
            self.found.add(FAIL, "mlflow version", f"MLflow {version} is not supported (traced-run supports "
                           f"MLflow {supported}; older ones have no OTLP route /v1/traces)",
                           f"upgrade the server: pip install 'mlflow{supported}'")
            return False
        self.found.add(OK, "mlflow version", f"MLflow {version}")
        self.check_links(version)
        return True

    def check_links(self, server: str) -> None:
        """What traces will be linked to (agent version, run), and whether this MLflow can take it."""
        from traced_run.delivery import links

        version = links.version_of(self.settings)
        if version is None and not self.settings.run_id:
            why = _no_git_version() if self.settings.agent_version == "git" else ""
            self.found.add(OK, "agent version", "traces are linked to no agent version (agent_version: "
                           f"{self.settings.agent_version}{why})")
            return
        kind, _, value = (version or "none:").partition(":")
        what = {"model": f"LoggedModel {value}", "name": f"the version named {value!r}",
                "none": "no agent version"}.get(kind) or _git_version(value)
        if not mlflow_api.links_traces(server):
            self.found.add(WARN, "agent version", f"traces would be linked to {what}, but MLflow {server} "
                           "cannot add links to a trace it stored from OTLP: they are not linked",
                           f"upgrade the server (mlflow{mlflow_api.LINKS_SINCE})")
            return
        self.found.add(OK, "agent version", f"traces are linked to {what}"
                       + (f" and run {self.settings.run_id}" if self.settings.run_id else ""))

    def check_workspace(self) -> bool:
        """The workspace traces go to exists (an unknown one is never a fall-back to default)."""
        workspace = self.settings.workspace
        if not workspace:
            return True
        answer = self.get("/api/3.0/mlflow/workspaces/" + urllib.parse.quote(workspace, safe=""))
        if self.auth_failed(answer, "workspace lookup") or self.workspace_missing(answer):
            return False
        if answer.status == 200 and isinstance(answer.json().get("workspace"), dict):
            self.found.add(OK, "workspace", f"{workspace!r} exists: the experiment and traces go there "
                           f"(X-MLFLOW-WORKSPACE)")
            return True
        what = _detail(answer) if answer.status else answer.problem
        self.found.add(FAIL, "workspace", f"MLFLOW_WORKSPACE={workspace} is set but {self.shown} answered "
                       f"the workspace lookup {what}",
                       "start mlflow server with --enable-workspaces, or unset "
                       "MLFLOW_WORKSPACE")
        return False


class _ExperimentChecks(_Asking):
    """The credentials, the experiment traces go to, and the run they are linked to."""

    def auth_and_experiment(self) -> bool:
        settings = self.settings
        if settings.experiment_id:
            answer = self.get("/api/2.0/mlflow/experiments/get?experiment_id=" + settings.experiment_id)
        else:
            name = settings.experiment_name or ""
            query = urllib.parse.urlencode({"experiment_name": name})
            answer = self.get(f"/api/2.0/mlflow/experiments/get-by-name?{query}" if name
                              else "/api/2.0/mlflow/experiments/get?experiment_id=0")
        if self.auth_failed(answer, "experiment lookup") or self.workspace_missing(answer):
            return False
        if answer.status is None:
            self.failed("experiment", answer, "MLflow stopped answering; try again")
            return False
        if answer.status == 200 or answer.json().get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            self.found.add(OK, "auth", f"accepted ({who(settings)})")
        experiment = answer.json().get("experiment") if answer.status == 200 else None
        if experiment:
            if experiment.get("lifecycle_stage") == "deleted":
                self.found.add(FAIL, "experiment", f"{experiment.get('name')!r} "
                               f"(id {experiment.get('experiment_id')}) is deleted",
                               "restore it in MLflow or set another experiment")
                return False
            self.experiment_id = printable(str(experiment["experiment_id"]))
            self.found.add(OK, "experiment", f"{experiment.get('name')!r} is id {self.experiment_id}")
            return True
        if answer.status == 404 and settings.experiment_name and not settings.experiment_id:
            self.found.add(OK, "experiment", f"{settings.experiment_name!r} does not exist yet: the first "
                           "traced run creates it (doctor creates nothing; its proof goes to the Default "
                           "experiment 0)")
            self.experiment_id = mlflow_api.DEFAULT_EXPERIMENT_ID
            return True
        if answer.status == 404 or answer.json().get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            self.found.add(FAIL, "experiment", f"no experiment with id {settings.experiment_id or '0'}",
                           "set MLFLOW_EXPERIMENT_ID to an existing id, or MLFLOW_EXPERIMENT_NAME instead")
            return False
        self.found.add(FAIL, "experiment", f"lookup answered {_detail(answer)}")
        return False

    def check_run(self) -> None:
        run_id = self.settings.run_id
        if not run_id:
            return
        answer = self.get("/api/2.0/mlflow/runs/get?" + urllib.parse.urlencode({"run_id": run_id}))
        if answer.status != 200:
            what = _detail(answer) if answer.status else answer.problem
            self.found.add(FAIL, "run id", f"{run_id!r}: {what}",
                           "set MLFLOW_RUN_ID to an existing run, or unset it")
            return
        info = answer.json().get("run", {}).get("info", {})
        if str(info.get("experiment_id")) != self.experiment_id:
            self.found.add(WARN, "run id", f"{run_id!r} belongs to experiment {info.get('experiment_id')}, "
                           f"traces go to {self.experiment_id}", "set the experiment the run belongs to")
            return
        self.found.add(OK, "run id", f"{run_id!r} exists ({info.get('status', '?')})")


class _TraceChecks(_Asking):
    """The OTLP route, which bodies it reads, and one trace sent and read back."""

    def check_otlp(self) -> bool:
        # An empty ExportTraceServiceRequest is a valid request that stores nothing.
        endpoint = self.settings.traces_endpoint or ""
        headers = otlp_headers(self.settings, self.experiment_id or mlflow_api.DEFAULT_EXPERIMENT_ID, None,
                               self.settings.workspace)
        answer = otlp_answer(self.request(endpoint, method="POST", data=b"", headers=headers))
        shown = mask_url(endpoint)
        if answer.status is None:
            what, fix = _problem_and_fix(answer.problem)
            self.found.add(FAIL, "otlp endpoint", f"{shown}: {what}", fix or "is the endpoint right and up?")
            return False
        if self.auth_failed(answer, shown) or self.workspace_missing(answer):
            return False
        if answer.status == 404:
            self.found.add(FAIL, "otlp endpoint", f"{shown}: HTTP 404",
                           "MLflow >= 3.6 serves /v1/traces only under its default uvicorn server "
                           "(not with --gunicorn-opts/--waitress-opts)")
            return False
        # MLflow answers an empty request 400 "no spans found": the route, headers and
        # experiment passed; a collector answers 200. Either way nothing is stored.
        empty_ok = answer.status == 400 and b"no spans" in answer.body
        if not (answer.ok or empty_ok):
            self.found.add(FAIL, "otlp endpoint", f"{shown}: {_detail(answer)}")
            return False
        self.found.add(OK, "otlp endpoint", f"{shown} accepts OTLP/HTTP protobuf ({answer.ms:.0f} ms); "
                       f"{self.compression(endpoint, headers)}")
        return True

    def compression(self, endpoint: str, headers: dict[str, str]) -> str:
        """Which bodies the server reads: the empty OTLP request again, gzip-compressed.
        MLflow 3.6 reads a gzip body as protobuf and refuses it; traced-run then sends plain."""
        answer = self.request(endpoint, method="POST", data=gzip.compress(b""),
                              headers={**headers, "Content-Encoding": "gzip"})
        if answer.ok or (answer.status == 400 and b"no spans" in answer.body):
            return "takes gzip bodies"
        return ("refuses gzip bodies: traced-run sends uncompressed there (it learns that at the first "
                "refused batch)")

    def end_to_end(self) -> None:
        from traced_run.delivery.export import Sender

        payload, trace_id = synthetic_trace(self.settings)
        started = time.monotonic()
        target = Target(self.settings.traces_endpoint or "", self.experiment_id, None, self.settings.run_id,
                        self.settings.workspace)
        # Sender.post: the very request an app's delivery thread makes (compression, headers, auth).
        outcome = Sender(self.settings).post(payload, target, timeout=max(STEP_TIMEOUT, 4.0))
        if not outcome.delivered:
            self.found.add(FAIL, "end-to-end", f"MLflow did not take the proof trace: {outcome.reason}")
            return
        # The trace's info: this route is in every MLflow from 3.6 (`traces/get` came later).
        path = "/api/3.0/mlflow/traces/" + urllib.parse.quote(trace_id)
        deadline = time.monotonic() + PROOF_WAIT
        while True:
            answer = self.get(path)
            if answer.status == 200 and answer.json().get("trace"):
                ms = (time.monotonic() - started) * 1000
                self.found.trace = {"trace_id": trace_id, "experiment_id": self.experiment_id,
                                    "round_trip_ms": round(ms)}
                self.found.add(OK, "end-to-end", f"trace {trace_id} sent and read back in {ms:.0f} ms "
                               f"(experiment {self.experiment_id}, tag {DOCTOR_TAG})")
                return
            if time.monotonic() >= deadline:
                what = _detail(answer) if answer.status else answer.problem
                self.found.add(FAIL, "end-to-end", f"trace {trace_id} was taken but not readable within "
                               f"{PROOF_WAIT:.0f} s (last: {what})", "look at the MLflow server's log")
                return
            time.sleep(0.2)


class MlflowChecks(_ServerChecks, _ExperimentChecks, _TraceChecks):
    """The checks that talk to MLflow, in order; each stops the rest when it must."""

    def run(self) -> None:
        self.check_transport()
        if not self.settings.tracking_uri:
            if self.settings.endpoint:
                self.found.add(WARN, "mlflow", "no tracking_uri: only the OTLP endpoint is checked",
                               "set MLFLOW_TRACKING_URI too for the experiment and read-back checks")
                self.experiment_id = self.settings.experiment_id or mlflow_api.DEFAULT_EXPERIMENT_ID
                self.check_otlp()
            return
        if not self.reachable():
            return
        if not self.version_and_host():
            return
        if not self.check_workspace():
            return
        if not self.auth_and_experiment():
            return
        self.check_run()
        if self.check_otlp() and self.proof:
            self.end_to_end()


def synthetic_trace(settings: Settings) -> tuple[bytes, str]:
    """One finished span made with the OTel SDK, encoded as apps' batches are."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from traced_run.delivery.export import encode

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-run-doctor"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("traced_run.doctor")
    with tracer.start_as_current_span("traced-run doctor", attributes={
            f"mlflow.traceTag.{DOCTOR_TAG}": "true", "input.value": "ping", "output.value": "pong"}) as span:
        trace_id = f"tr-{span.get_span_context().trace_id:032x}"
    provider.shutdown()
    return encode(memory.get_finished_spans(), settings), trace_id


def _no_git_version() -> str:
    from traced_run.config import git

    try:
        git.read(pathlib.Path.cwd())
    except (git.GitUnreadable, OSError) as error:
        return f", {error}"
    return ", no git checkout here"


def _git_version(tags: str) -> str:
    from traced_run.config import git

    found = json.loads(tags)
    dirty = " (with uncommitted changes)" if found[git.DIRTY] == "true" else ""
    return f"the version of git commit {found[git.COMMIT][:12]} on {found[git.BRANCH]}{dirty}"


# -- local: the bootstrap in a child, sitecustomize, spool ---------------------------------

PROBE = (
    "import json, sys; s = sys.modules.get('sitecustomize'); "
    "print(json.dumps({'boot': 'traced_run.bootstrap' in sys.modules, "
    "'sitecustomize': getattr(s, '__file__', None), 'python': sys.executable}))"
)


def check_bootstrap(env: dict[str, str], found: Findings) -> None:
    """A child started as the launcher starts apps (its environment, `python` from PATH)."""
    from traced_run.bootstrap import BOOT_DIR

    # Only absolute PATH entries: "." or an empty entry would run a `python` of the working
    # directory, which a cloned repository chooses.
    path = os.pathsep.join(entry for entry in env.get("PATH", "").split(os.pathsep) if os.path.isabs(entry))
    python = shutil.which("python", path=path) or shutil.which("python3", path=path) or sys.executable
    # The probe never imports pydantic_ai: the bootstrap loads but builds nothing and sends nothing.
    # `-c` puts the working directory first on sys.path, where a json.py would run with the user's
    # rights: the child works in an empty directory of its own (not -I or -E, which would skip the
    # PYTHONPATH under test; not -P, which Python 3.10 lacks).
    try:
        with tempfile.TemporaryDirectory(prefix="traced-run-doctor-") as neutral:
            done = subprocess.run([python, "-c", PROBE], env=env, cwd=neutral, capture_output=True,
                                  text=True, timeout=CHILD_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        found.add(FAIL, "bootstrap", f"`{python} -c ...` did not run: {error}")
        return
    try:
        seen = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found.add(FAIL, "bootstrap", f"`{python} -c ...` failed (exit {done.returncode}): "
                  f"{(done.stderr.strip().splitlines() or [''])[-1]}")
        return
    if not seen["boot"]:
        found.add(FAIL, "bootstrap", f"{python} does not load traced-run's bootstrap",
                  "`python` on PATH is another environment: install traced-run there, or activate this one "
                  f"({sys.executable})")
        return
    found.add(OK, "bootstrap", f"`python -c` ({seen['python']}) loads traced_run.bootstrap from {BOOT_DIR}")
    user = seen.get("sitecustomize")
    if user and os.path.dirname(os.path.abspath(user)) != BOOT_DIR:
        failed = [line for line in done.stderr.splitlines() if "sitecustomize" in line]
        if failed:
            found.add(WARN, "sitecustomize", f"the user's {user} fails: {failed[0]}",
                      "fix it; tracing runs anyway")
        else:
            found.add(OK, "sitecustomize", f"the user's {user} would be shadowed by traced-run's; it is "
                      "chained (runs once, first)")
    else:
        found.add(OK, "sitecustomize", "no user sitecustomize (nothing shadowed)")


def check_spool(settings: Settings, found: Findings) -> dict[str, Any]:
    """What the spool holds; reads, changes nothing (a file that is no batch is
    set aside by the next sender, not here)."""
    spool = Spool.of(settings)
    try:
        seen = spool.survey(settings.traces_endpoint or "")
    except OSError as error:
        found.add(FAIL, "spool", str(error) if isinstance(error, SpoolRefused)
                  else f"cannot read {spool.directory}: {error.strerror}")
        return {"directory": str(spool.directory), "problem": str(error)}
    state = {"directory": str(spool.directory), "batches": seen.batches, "spans": seen.spans,
             "for_this_endpoint": seen.for_endpoint, "rejected": seen.rejected, "unreadable": seen.unreadable,
             "expired": seen.expired,
             "other_endpoints": {endpoint: asdict(pile) for endpoint, pile in seen.others.items()}}
    if seen.batches:
        found.add(WARN, "spool", f"{seen.batches} batches ({seen.spans} spans) waiting in {spool.directory}, "
                  f"{seen.for_endpoint} of them for this endpoint",
                  "`traced-run flush` sends them once MLflow answers")
    else:
        found.add(OK, "spool", f"empty ({spool.directory})")
    if seen.others:
        from traced_run.commands.flush import piles

        found.add(WARN, "spool other endpoints", "; ".join(piles(seen.others)),
                  f"`traced-run flush --endpoint URL` sends them to "
                  f"{mask_url(settings.traces_endpoint or '')}, "
                  "`traced-run flush --drop-other-endpoints` removes them")
    if seen.expired:
        found.add(WARN, "spool expired", f"{counted(seen.expired, 'batch', 'batches')} older than "
                  f"spool_max_age={age(settings.spool_max_age)}",
                  "the next traced process or `traced-run flush` removes them")
    if seen.unreadable:
        found.add(WARN, "spool unreadable", f"{seen.unreadable} files named like batches are none "
                  f"(first: {seen.first_unreadable})", "`traced-run flush` sets them aside in "
                  f"{spool.rejected}; delete them")
    if seen.rejected:
        found.add(WARN, "spool rejected",
                  f"{seen.rejected} batches MLflow refused are set aside in {spool.rejected}",
                  "read their .reason.txt; once the cause is fixed, `traced-run flush --set-aside` sends "
                  "them again, or delete them")
    return state


# -- the command --------------------------------------------------------------------------


def run(env: dict[str, str], *, proof: bool = True) -> tuple[Findings, dict[str, Any]]:
    """All checks; network ones bounded by TOTAL_BOUND."""
    started = time.monotonic()
    found = Findings()
    extra: dict[str, Any] = {}
    try:
        loaded = load(env)
    except report.ConfigError as error:
        found.add(FAIL, "settings", str(error), "fix that setting (`traced-run config` shows the others)")
        extra["versions"] = check_versions(found)
        check_bootstrap(env, found)
        return found, extra
    check_settings(loaded, found)
    for note in loaded.notes:
        found.add(WARN, "config file", note)
    extra["settings"] = {name: {"value": shown(name, getattr(loaded.settings, name)),
                                "source": loaded.sources[name]} for name in SPECS}
    network = Findings()
    # The timeout of the app's own requests does not apply here: doctor must stay short.
    checks = MlflowChecks(replace(loaded.settings, timeout=STEP_TIMEOUT), network, proof)
    worker = threading.Thread(target=_guarded(checks.run, network), name="traced-run-doctor", daemon=True)
    if loaded.settings.enabled and loaded.settings.traces_endpoint:
        worker.start()
    extra["versions"] = check_versions(found)
    local = Findings()
    check_bootstrap(env, local)
    extra["spool"] = _bounded_spool_check(loaded.settings, local)
    if worker.is_alive() or worker.ident is not None:
        worker.join(max(0.0, TOTAL_BOUND - (time.monotonic() - started)))
        if worker.is_alive():
            network.add(FAIL, "mlflow", f"the checks did not finish within {TOTAL_BOUND:.0f} s "
                        "(a DNS lookup or a server that hangs)", "check the host name and the server")
    found.checks += list(network.checks) + local.checks
    found.trace = network.trace
    return found, extra


def _bounded_spool_check(settings: Settings, found: Findings) -> dict[str, Any]:
    """check_spool on a thread: a spool on a file system that hangs (a dead
    NFS mount) cannot hold the doctor either."""
    state: dict[str, Any] = {}
    spool = Findings()

    def step() -> None:
        state.update(check_spool(settings, spool))

    worker = threading.Thread(target=_guarded(step, spool, "spool"), name="traced-run-doctor-spool",
                              daemon=True)
    worker.start()
    worker.join(SPOOL_BOUND)
    if worker.is_alive():
        found.add(FAIL, "spool", f"reading the spool did not finish within {SPOOL_BOUND:.0f} s",
                  "check the file system it is on (TRACED_RUN_SPOOL_DIR)")
        return {"problem": "timed out"}
    found.checks += spool.checks
    return state


def _guarded(step: Callable[[], None], found: Findings, check: str = "mlflow") -> Callable[[], None]:
    def guarded() -> None:
        try:
            step()
        except Exception as error:  # a doctor that crashes tells nothing: report it as a check
            found.add(FAIL, check, f"unexpected {type(error).__name__}: {error}")

    return guarded


def main(argv: list[str], env: dict[str, str], parser_class: type[argparse.ArgumentParser]) -> int:
    parser = parser_class(
        prog="traced-run doctor",
        description="Check the settings, the installation and the MLflow server, and send one small trace "
        "end to end. Exit 0 when no check FAILs, 1 otherwise; finishes within about 15 s even when MLflow "
        "hangs.")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--no-trace", action="store_true",
                        help="do not send the end-to-end proof trace (nothing is written to MLflow)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    found, extra = run(env, proof=not args.no_trace)
    failed = any(c.status == FAIL for c in found.checks)
    seconds = round(time.monotonic() - started, 2)
    if args.json:
        document = {"ok": not failed, "seconds": seconds, "checks": [asdict(c) for c in found.checks],
                    "trace": found.trace or None, **extra}
        print(json.dumps(document, indent=2))
    else:
        for check in found.checks:
            print(check.line())
        counts = {s: sum(1 for c in found.checks if c.status == s) for s in (FAIL, WARN, OK)}
        print(f"-- {counts[FAIL]} FAIL, {counts[WARN]} WARN, {counts[OK]} OK in {seconds:.1f} s")
    return 1 if failed else 0
