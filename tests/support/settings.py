"""Loading settings in process: a working directory with no config file in it,
the one error line a bad environment gives, and a sample value per setting."""

from __future__ import annotations

from typing import Any

import pytest

from traced_run.config.sources import load
from traced_run.report import ConfigError


def error_of(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(environ)
    message = str(info.value)
    assert "\n" not in message and message == message.strip(), message
    return message


# name: (YAML value, the value that gives, env text, the value with that env on top)
SAMPLES: dict[str, tuple[Any, Any, str, Any]] = {
    "enabled": (False, False, "true", True),
    "strict": (True, True, "false", False),
    "tracking_uri": ("http://yaml-host:5000/", "http://yaml-host:5000", "https://env-host:8443",
                     "https://env-host:8443"),
    "experiment_id": (12, "12", "34", "34"),
    "experiment_name": ("from-yaml", "from-yaml", " from-env ", "from-env"),
    "run_id": ("run-yaml", "run-yaml", "run-env", "run-env"),
    "model_id": ("m-yaml", "m-yaml", "m-env", "m-env"),
    "agent_version": ("off", "off", " support-v2 ", "support-v2"),
    "workspace": ("team-a", "team-a", " team-b ", "team-b"),
    "username": ("alice", "alice", "bob", "bob"),
    "password": ("yaml-pw", "yaml-pw", "env-pw", "env-pw"),
    "token": ("yaml-token", "yaml-token", "env-token", "env-token"),
    "endpoint": ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces",
                 "https://other:4318/v1/traces/", "https://other:4318/v1/traces"),
    "headers": ({"x-a": "1", "x-b": "2"}, {"x-a": "1", "x-b": "2"}, "x-b=3,x-c=a%2Cb",
                {"x-a": "1", "x-b": "3", "x-c": "a,b"}),
    "ca_bundle": ("/etc/hosts", "/etc/hosts", "/etc", "/etc"),
    "client_cert": ("/etc/hosts", "/etc/hosts", "/etc/passwd", "/etc/passwd"),
    "client_key": ("/etc/passwd", "/etc/passwd", "/etc/hosts", "/etc/hosts"),
    "insecure_tls": (False, False, "true", True),
    "timeout": (3, 3.0, "4.5", 4.5),
    "compression": ("deflate", "deflate", "NONE", "none"),
    "service_name": ("svc-yaml", "svc-yaml", "svc-env", "svc-env"),
    "resource_attributes": ({"team": "a", "flag": True}, {"team": "a", "flag": "true"},
                            "env=prod,team=b", {"team": "b", "flag": "true", "env": "prod"}),
    "exit_timeout": (1.5, 1.5, "7", 7.0),
    "queue_size": (100, 100, "200", 200),
    "spool_dir": ("/var/spool/yaml", "/var/spool/yaml", " /tmp/env-spool ", "/tmp/env-spool"),
    "spool_max_mb": (16, 16, "32", 32),
    "spool_max_age": ("3d", 259200.0, "3600", 3600.0),
    "instrumentation_version": (2, 2, "3", 3),
    "include_content": (False, False, "yes", True),
    "include_binary_content": ("off", False, "1", True),
    "redact": (["tok-[0-9]{4,8}"], ("tok-[0-9]{4,8}",), r"a{1,2}, b\,c ,(x|y)",
               ("a{1,2}", r"b\,c", "(x|y)")),
    "redact_defaults": (False, False, "on", True),
    "redaction_marker": ("<gone>", "<gone>", " *** ", "***"),
    "max_binary_bytes": (1024, 1024, "2048", 2048),
    "session_id": ("batch-7", "batch-7", "batch-8", "batch-8"),
    "user_id": ("alice", "alice", "bob", "bob"),
    "tags": ({"environment": "prod", "version": "1.4.2"}, {"environment": "prod", "version": "1.4.2"},
             "version=1.5.0,git_commit=abc123",
             {"environment": "prod", "version": "1.5.0", "git_commit": "abc123"}),
    "trace_name": ("nightly", "nightly", "hourly", "hourly"),
    "sample_ratio": (0.25, 0.25, "1", 1.0),
    "propagate_context": ("off", False, "1", True),
    "mode": ("mlflow", "mlflow", "OTLP", "otlp"),
}
