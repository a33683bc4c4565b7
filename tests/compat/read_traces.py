"""Runs with the MLflow server's own venv (its client speaks its API): waits
until COUNT complete traces are in EXPERIMENT, then prints them as JSON.
COUNT 0 prints what is there at once (nothing is expected)."""

import json
import sys
import time

from mlflow.tracking import MlflowClient

url, experiment_name, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = MlflowClient(tracking_uri=url)


def found() -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return list(client.search_traces(experiment_ids=[experiment.experiment_id], max_results=100))


deadline = time.monotonic() + timeout
traces = found()
while count and time.monotonic() < deadline:
    done = [t for t in traces if str(t.info.state).rsplit(".", 1)[-1] in ("OK", "ERROR")]
    if len(traces) >= count and len(done) == len(traces):
        break
    time.sleep(0.5)
    traces = found()


def model_tags(trace) -> dict:
    """The tags of the agent version (LoggedModel) the trace is linked to, if any."""
    model_id = trace.info.trace_metadata.get("mlflow.modelId")
    return dict(client.get_logged_model(model_id).tags) if model_id else {}


json.dump([{
    "state": str(t.info.state).rsplit(".", 1)[-1],
    "request_preview": t.info.request_preview,
    "metadata": dict(t.info.trace_metadata),
    "model_tags": model_tags(t),
    "spans": [{"name": s.name, "type": str(s.span_type), "parent": s.parent_id, "inputs": s.inputs}
              for s in t.data.spans],
} for t in traces], sys.stdout, default=str)
