"""See the main job run: a local MLflow (sqlite, loopback), the example agent
run unchanged under ``traced-run``, and where its trace is.

    python examples/quickstart.py          # stops MLflow at the end
    python examples/quickstart.py --keep   # leaves it running to browse the UI
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
EXPERIMENT = "quickstart"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read() or b"{}")


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"quickstart: timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave MLflow running at the end")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="traced-run-quickstart-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    print(f"starting MLflow on {url} (sqlite in {workdir}) ...", flush=True)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(workdir / "mlflow.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        _wait("MLflow to start", lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
              180)
        env = dict(os.environ, MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_NAME=EXPERIMENT,
                   # A fresh MLflow spends seconds on its first agent trace (lazy imports);
                   # the default exit bound of 2 s would report those spans as lost.
                   TRACED_RUN_EXIT_TIMEOUT="60")
        command = [shutil.which("traced-run", path=str(BIN)) or "traced-run",
                   sys.executable, str(HERE / "weather_agent.py")]
        print("$ traced-run python examples/weather_agent.py", flush=True)
        subprocess.run(command, env=env, check=True)

        experiment = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")
        experiment_id = experiment["experiment"]["experiment_id"]
        found = _wait("the trace", lambda: _post(f"{url}/api/3.0/mlflow/traces/search", {
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}}]}).get("traces"), 60)
        trace_id = found[0]["trace_id"]
        print(f"\ntrace {trace_id} is in experiment {EXPERIMENT!r} (id {experiment_id}):")
        print(f"  UI:   {url}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}")
        print(f"  REST: {url}/api/3.0/mlflow/traces/get?trace_id={trace_id}")
        full = _get(f"{url}/api/3.0/mlflow/traces/get?trace_id={trace_id}")
        for span in full["trace"]["spans"]:
            kind = next((a.get("value", {}).get("string_value", "") for a in span.get("attributes", [])
                         if a.get("key") == "mlflow.spanType"), "")
            print(f"  span {span['name']!r} {kind.strip(chr(34))}")
        if args.keep:
            print(f"\nMLflow keeps running at {url}; press Ctrl-C to stop it.", flush=True)
            server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
