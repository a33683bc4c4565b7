"""The launcher and the env-only bootstrap as a user meets them: real processes,
their exit codes, stdout and stderr. Every refusal is one ``traced-run:`` line
on stderr, never a traceback, never a secret; the app's stdout stays its own."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import AGENT_APP, BIN, GENEROUS_EXIT, TRACED_RUN, App, clean_env

import traced_run
from traced_run.config.settings import SPECS

SECRET = "hunter2-s3cret"
UNUSED_URI = "http://127.0.0.1:9"
"""A valid tracking URI for runs that never get as far as sending anything."""
MARKER_APP = "open('ran', 'w').close(); print('app ran')"
"""``python -c`` source that leaves a file behind when the command was run at all."""

LAUNCHERS = {"script": [TRACED_RUN], "module": [sys.executable, "-m", "traced_run"],
             "python script": [str(BIN / "traced-run-py")]}
"""``traced-run`` is the shell launcher; the other two are the Python launcher it hands over to."""


def launch(*argv: str, cwd: Path, env: dict[str, str] | None = None,
           launcher: Sequence[str] = (TRACED_RUN,)) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*launcher, *argv], cwd=cwd, env=env if env is not None else clean_env(),
                          capture_output=True, text=True, timeout=60)


def one_line(stderr: str) -> str:
    """The single ``traced-run:`` line a refusal consists of, without its prefix."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("traced-run: "), stderr
    assert stderr.endswith("\n")
    return lines[0].removeprefix("traced-run: ")


def show_config(cwd: Path, env: dict[str, str], *options: str) -> dict[str, tuple[Any, str]]:
    done = launch(*options, "config", cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert yaml.safe_load(done.stdout).keys() == SPECS.keys(), "the output is YAML"
    shown: dict[str, tuple[Any, str]] = {}
    for line in done.stdout.splitlines():
        found = re.fullmatch(r"(\w+): (.*)  # (.+)", line)
        assert found, line
        shown[found[1]] = (yaml.safe_load(found[2]), found[3])
    assert list(shown) == list(SPECS), "every setting, once, in table order"
    return shown


# -- the launcher's own options and exit codes -------------------------------------------


def test_help_lists_every_option_of_the_table(tmp_path: Path) -> None:
    done = launch("--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: traced-run ")
    for name, spec in SPECS.items():
        if spec.option:
            assert spec.option in done.stdout, name
            for var in spec.env:
                assert var in done.stdout, var
    for option in ("--version", "traced-run config", "traced-run flush", "--print-pythonpath", "exit codes"):
        assert option in done.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_version(launcher: str, tmp_path: Path) -> None:
    done = launch("--version", cwd=tmp_path, launcher=LAUNCHERS[launcher])
    assert (done.returncode, done.stdout, done.stderr) == (0, f"traced-run {traced_run.__version__}\n", "")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_missing_command_exits_127_with_one_line(launcher: str, tmp_path: Path) -> None:
    done = launch("no-such-command-8f3a", "--flag", cwd=tmp_path, launcher=LAUNCHERS[launcher],
                  env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 127
    assert one_line(done.stderr) == "command not found: no-such-command-8f3a"
    assert done.stdout == ""


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_no_command_exits_2(launcher: str, tmp_path: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI)
    for argv in ([], ["--"], ["--strict"], ["--service-name", "svc", "--"]):
        done = launch(*argv, cwd=tmp_path, env=env, launcher=LAUNCHERS[launcher])
        assert done.returncode == 2, argv
        assert one_line(done.stderr).startswith("no command given: traced-run [OPTIONS] COMMAND"), argv
        assert done.stdout == ""


def test_a_file_that_is_not_executable_exits_126(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("echo hi\n")
    (tmp_path / "folder").mkdir()
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI)
    for command in ("./notes.txt", "./folder"):
        done = launch(command, cwd=tmp_path, env=env)
        assert done.returncode == 126, command
        assert one_line(done.stderr) == f"command not executable: {command}"
        assert done.stdout == ""


@pytest.mark.parametrize("argv", [
    ["--bogus", "python", "-V"],
    ["--tracking-uri"],
    ["--disable=yes", "python", "-V"],
    ["--strict=1", "true"],
])
def test_a_wrong_option_exits_2_with_one_line(argv: list[str], tmp_path: Path) -> None:
    done = launch(*argv, cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 2
    message = one_line(done.stderr)
    assert argv[0].split("=")[0] in message and message.endswith("(see traced-run --help)")
    assert done.stdout == ""


def test_the_command_gets_its_arguments_and_exit_code_unchanged(tmp_path: Path) -> None:
    source = "import sys; print(sys.argv[1:]); sys.exit(3)"
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI)
    for prefix in ([], ["--"], ["--strict", "--"]):
        done = launch(*prefix, "python", "-c", source, "--", "--strict", "--version", "-x", "",
                      cwd=tmp_path, env=env)
        assert done.returncode == 3, (prefix, done.stderr)
        assert done.stdout == "['--', '--strict', '--version', '-x', '']\n"
        assert done.stderr == ""


def test_a_command_named_like_an_option_follows_double_dash(tmp_path: Path) -> None:
    done = launch("--", "--weird-name", cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 127
    assert one_line(done.stderr) == "command not found: --weird-name"


def test_the_launcher_becomes_the_command(tmp_path: Path) -> None:
    """exec, not a child: same pid, stdin and signals reach the app directly."""
    process = subprocess.Popen(
        [TRACED_RUN, "python", "-c", "import os, sys; print(os.getpid(), sys.stdin.read())"],
        cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate("from stdin", timeout=60)
    assert (process.returncode, out, err) == (0, f"{process.pid} from stdin\n", "")


def test_print_pythonpath_names_the_bootstrap_the_launcher_puts_first(tmp_path: Path) -> None:
    done = launch("--print-pythonpath", cwd=tmp_path)  # needs no settings at all
    assert done.returncode == 0 and done.stderr == ""
    (line,) = done.stdout.splitlines()
    boot = Path(line)
    assert boot.is_absolute() and (boot / "sitecustomize.py").is_file()

    user_path = str(tmp_path / "mine")
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI, PYTHONPATH=f"{user_path}{os.pathsep}{boot}")
    done = launch("python", "-c", "import os; print(os.environ['PYTHONPATH'])", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(os.pathsep) == [str(boot), user_path]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_without_a_tracking_uri_the_launcher_exits_78(launcher: str, tmp_path: Path) -> None:
    done = launch("python", "-c", MARKER_APP, cwd=tmp_path, launcher=LAUNCHERS[launcher])
    assert done.returncode == 78
    assert one_line(done.stderr) == ("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or "
                                     "tracking_uri in the config file")
    assert done.stdout == "" and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(("argv", "env"), [
    (["--disable"], {}),
    ([], {"TRACED_RUN_ENABLED": "false"}),
    ([], {"OTEL_SDK_DISABLED": "true"}),
    ([], {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}),
    (["--tracking-uri", UNUSED_URI], {}),
])
def test_a_tracking_uri_is_not_needed_when_disabled_or_given_otherwise(
        argv: list[str], env: dict[str, str], tmp_path: Path) -> None:
    done = launch(*argv, "python", "-c", MARKER_APP, cwd=tmp_path, env=clean_env(**env))
    assert (done.returncode, done.stdout, done.stderr) == (0, "app ran\n", "")


# -- the shell launcher's fast path -----------------------------------------------------

ENV_PROBE = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
             "('PYTHONPATH', 'TRACED_RUN_OPTIONS', 'TRACED_RUN_LAUNCHED')}))")


def test_the_shell_launcher_knows_the_options_of_the_settings_table() -> None:
    """scripts/traced-run turns options into TRACED_RUN_OPTIONS itself; its spelling must be the table's."""
    script = (Path(traced_run.__file__).parents[2] / "scripts" / "traced-run").read_text()
    assert Path(TRACED_RUN).read_text() == script, "the installed launcher is the repository's"
    valued = dict(re.findall(r"(--[a-z-]+) \| \1=\*\) key=(\w+) ;;", script))
    switches = re.findall(r"(--[a-z-]+)\) pair='\"(\w+)\": (true|false)' ;;", script)
    flags = {option: (name, json.loads(value)) for option, name, value in switches}
    assert valued == {spec.option: name for name, spec in SPECS.items()
                      if spec.option and spec.option_value is None and name != "config"}
    assert flags == {spec.option: (name, spec.option_value) for name, spec in SPECS.items()
                     if spec.option and spec.option_value is not None}


@pytest.mark.parametrize(("argv", "fast"), [
    (["python", "-c", "pass"], True),
    (["--strict", "--experiment-name", "x", "--run-id=r1", "--", "python", "app.py"], True),
    (["pip", "--version"], True),
    (["python", "-I", "-c", "pass"], False),
    (["--config", "team.yaml", "python", "-c", "pass"], False),
    (["--experiment", "x", "python", "-c", "pass"], False),  # abbreviated: argparse decides
    (["--service-name", "a\"b", "python", "-c", "pass"], False),
    (["true"], False),
    (["config"], False),
], ids=["python", "options", "venv script", "python -I", "--config", "abbreviated", "quote", "true",
        "config"])
def test_the_shell_launcher_starts_no_python_of_its_own_for_the_common_case(
        argv: list[str], fast: bool, tmp_path: Path) -> None:
    """``sh -x`` shows what the launcher execs: the command itself, or the Python launcher."""
    done = subprocess.run(["sh", "-x", TRACED_RUN, *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI), timeout=60)
    execs = [line for line in done.stderr.splitlines() if line.startswith("+ exec ")]
    assert len(execs) == 1, done.stderr
    assert ("traced-run-py" not in execs[0]) == fast, execs


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_the_app_gets_the_options_and_the_bootstrap_and_nothing_stale(launcher: str, tmp_path: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI, PYTHONPATH="/elsewhere",
                    TRACED_RUN_OPTIONS='{"service_name": "stale"}', TRACED_RUN_LAUNCHED="1")
    boot = launch("--print-pythonpath", cwd=tmp_path).stdout.strip()
    for options, expected in (([], None),
                              (["--strict", "--service-name=svc", "--experiment-id", "3", "--"],
                               {"strict": True, "service_name": "svc", "experiment_id": "3"})):
        done = launch(*options, "python", "-c", ENV_PROBE, cwd=tmp_path, env=env,
                      launcher=LAUNCHERS[launcher])
        assert done.returncode == 0 and done.stderr == "", done.stderr
        seen = json.loads(done.stdout)
        assert seen["PYTHONPATH"] == f"{boot}{os.pathsep}/elsewhere"
        assert (json.loads(seen["TRACED_RUN_OPTIONS"]) if seen["TRACED_RUN_OPTIONS"] else None) == expected
        assert seen["TRACED_RUN_LAUNCHED"] is None, "the check is the launched process's alone"


@pytest.mark.parametrize("command", [
    ["python", "-I", "-c", MARKER_APP],  # no PYTHONPATH: the Python launcher checks
    ["python", "-X", "dev", "-c", MARKER_APP],
    ["pip", "--version"],  # a script of the environment: its interpreter checks
    ["sh", "-c", "python -c \"$0\"", MARKER_APP],  # not Python: the Python launcher checks
], ids=["python -I", "python -X dev", "pip", "sh"])
def test_every_kind_of_command_is_refused_before_it_runs(command: list[str], tmp_path: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:99999")
    done = launch(*command, cwd=tmp_path, env=env)
    assert done.returncode == 78
    assert one_line(done.stderr) == ("env MLFLOW_TRACKING_URI: tracking_uri: the URL's port is not a number, "
                                     "got 'http://127.0.0.1:99999'")
    assert done.stdout == "" and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("options", [[], ["--service-name", "svc"], ["--config", "team.yaml"]],
                         ids=["no option", "an option", "--config (the Python launcher)"])
def test_a_user_sitecustomize_runs_once_under_the_launcher(options: list[str], tmp_path: Path) -> None:
    (tmp_path / "team.yaml").write_text("service_name: team\n")
    (tmp_path / "usersite").mkdir()
    (tmp_path / "usersite" / "sitecustomize.py").write_text(
        "import os, sys\nwith open('log', 'a') as log:\n    log.write(f'{os.getpid()} {sys.argv[0]}\\n')\n")
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI, PYTHONPATH=str(tmp_path / "usersite"))
    done = launch(*options, "python", "-c", "pass", cwd=tmp_path, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert (tmp_path / "log").read_text().split()[1:] == ["-c"]


# -- traced-run config ----------------------------------------------------------------------


def test_show_config_prints_every_setting_with_the_source_that_decided_it(tmp_path: Path) -> None:
    config = tmp_path / "traced-run.yaml"
    config.write_text("# team defaults\nsession_id: nightly\nservice_name: from-yaml\n"
                      "tags: {team: agents}\n")
    env = clean_env(MLFLOW_TRACKING_URI="http://mlflow.example.com:5000/", MLFLOW_EXPERIMENT_NAME="agents",
                    TRACED_RUN_SESSION_ID="", TRACED_RUN_TAGS="env=prod",
                    TRACED_RUN_OPTIONS='{"service_name": "stale, from some outer launcher"}')
    shown = show_config(tmp_path, env, "--service-name", "from-option", "--experiment-id", "42")
    assert shown["config"] == (str(config), "found in the working directory")
    assert shown["tracking_uri"] == ("http://mlflow.example.com:5000", "env MLFLOW_TRACKING_URI")
    assert shown["service_name"] == ("from-option", "option --service-name")
    assert shown["session_id"] == ("nightly", f"{config}:2")  # the empty env var counts as unset
    assert shown["tags"] == ({"team": "agents", "env": "prod"}, f"{config}:4 + env TRACED_RUN_TAGS")
    # an option naming the experiment id beats the environment's name
    assert shown["experiment_id"] == ("42", "option --experiment-id")
    assert shown["experiment_name"] == (None, "default")
    assert shown["compression"] == ("gzip", "default")
    assert shown["enabled"] == (True, "default")
    assert shown["headers"] == ({}, "default")


def test_show_config_needs_no_tracking_uri_and_reports_the_kill_switch(tmp_path: Path) -> None:
    shown = show_config(tmp_path, clean_env(OTEL_SDK_DISABLED="true"))
    assert shown["tracking_uri"] == (None, "default")
    assert shown["enabled"] == (False, "env OTEL_SDK_DISABLED")
    shown = show_config(tmp_path, clean_env(OTEL_SDK_DISABLED="true"), "--disable", "--strict")
    assert shown["enabled"] == (False, "option --disable")
    assert shown["strict"] == (True, "option --strict")


def test_show_config_masks_every_secret(tmp_path: Path) -> None:
    config = tmp_path / "team.yaml"
    config.write_text(f"headers:\n  x-api-key: {SECRET}\ntoken: ${{TOKEN}}\n"
                      "endpoint: https://collector.example.com/v1/traces\n")
    env = clean_env(TRACED_RUN_CONFIG=str(config), TOKEN=SECRET,
                    MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=SECRET,
                    OTEL_EXPORTER_OTLP_TRACES_HEADERS=f"Authorization=Bearer%20{SECRET}",
                    TRACED_RUN_REDACT=f"{SECRET},ok")
    done = launch("config", cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stderr == ""
    assert SECRET not in done.stdout
    shown = show_config(tmp_path, env)
    assert shown["password"] == ("***", "env MLFLOW_TRACKING_PASSWORD")
    assert shown["token"] == ("***", f"{config}:3")
    assert shown["username"] == ("alice", "env MLFLOW_TRACKING_USERNAME")
    assert shown["headers"] == ({"x-api-key": "***", "Authorization": "***"},
                                f"{config}:1 + env OTEL_EXPORTER_OTLP_TRACES_HEADERS")
    assert shown["endpoint"][0] == "https://collector.example.com/v1/traces"
    assert shown["redact"] == (["***", "***"], "env TRACED_RUN_REDACT")


# -- invalid settings: exit 78, one line, the command never runs --------------------------

CONFIG_ERRORS: list[tuple[str, str | None, dict[str, str], list[str], str]] = [
    # (id, TRACED_RUN_CONFIG's text, env, options, the expected line after "traced-run: ")
    ("unknown key", "timeout: 3\ntracking_urn: http://x\n", {}, [],
     "{cfg}:2: unknown key 'tracking_urn' (did you mean 'tracking_uri'?)"),
    ("yaml timeout", "timeout: abc\n", {}, [],
     "{cfg}:1: timeout: expected a number of seconds, got 'abc'"),
    ("yaml bool", "\ninclude_content: maybe\n", {}, [],
     "{cfg}:2: include_content: expected true or false, got 'maybe'"),
    ("env timeout", None, {"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, [],
     "env OTEL_EXPORTER_OTLP_TIMEOUT: timeout: expected a number of seconds, got 'abc'"),
    ("env url", None, {"MLFLOW_TRACKING_URI": "localhost:5000"}, [],
     "env MLFLOW_TRACKING_URI: tracking_uri: expected an http:// or https:// URL with a host, "
     "got 'localhost:5000'"),
    ("option url", None, {}, ["--tracking-uri", "mlflow"],
     "option --tracking-uri: tracking_uri: expected an http:// or https:// URL with a host, got 'mlflow'"),
    ("option id", None, {}, ["--experiment-id", "abc"],
     "option --experiment-id: experiment_id: expected a numeric MLflow experiment id (digits 0-9), "
     "got 'abc'"),
    ("yaml both experiments", "experiment_id: 1\nexperiment_name: x\n", {}, [],
     "both experiment_id ({cfg}:1) and experiment_name ({cfg}:2) are set; set only one"),
    # a file contradicting itself is wrong even where a higher source decides, like any wrong value
    ("yaml both experiments, env decides", "experiment_id: 1\nexperiment_name: x\n",
     {"MLFLOW_EXPERIMENT_NAME": "y"}, [],
     "both experiment_id ({cfg}:1) and experiment_name ({cfg}:2) are set; set only one"),
    ("env both experiments", None, {"MLFLOW_EXPERIMENT_ID": "1", "MLFLOW_EXPERIMENT_NAME": "x"}, [],
     "both experiment_id (env MLFLOW_EXPERIMENT_ID) and experiment_name (env MLFLOW_EXPERIMENT_NAME) "
     "are set; set only one"),
    ("malformed", "timeout: 3\nheaders: {a: 1\n", {}, [],
     "{cfg}:3:1: malformed YAML: expected ',' or '}}', but got '<stream end>'"),
    ("not a mapping", "- timeout: 3\n", {}, [],
     "{cfg}:1: expected a mapping of settings at the top level"),
    ("missing var", "token: ${NO_SUCH_VAR_X}\n", {}, [],
     "{cfg}:1: token: ${{NO_SUCH_VAR_X}} is not set in the environment"),
    ("config env missing", None, {"TRACED_RUN_CONFIG": "nowhere.yaml"}, [],
     "env TRACED_RUN_CONFIG: config: no such file: 'nowhere.yaml'"),
    ("config option missing", None, {}, ["--config", "nowhere.yaml"],
     "option --config: config: no such file: '{dir}/nowhere.yaml'"),
    ("kill switch typo", None, {"OTEL_SDK_DISABLED": "ture"}, [],
     "env OTEL_SDK_DISABLED: enabled: expected true or false, got 'ture'"),
]


@pytest.mark.parametrize(("yaml_text", "env", "options", "expected"),
                         [case[1:] for case in CONFIG_ERRORS], ids=[case[0] for case in CONFIG_ERRORS])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_invalid_settings_exit_78_with_one_line_and_do_not_run_the_command(
        yaml_text: str | None, env: dict[str, str], options: list[str], expected: str, launcher: str,
        tmp_path: Path) -> None:
    """The shell launcher has the app's interpreter refuse them, at start-up, with the same line."""
    config = tmp_path / "traced-run.yaml"
    environ = clean_env(**{"MLFLOW_TRACKING_URI": UNUSED_URI, **env})
    if yaml_text is not None:
        config.write_text(yaml_text)
        environ["TRACED_RUN_CONFIG"] = str(config)  # a file nobody named may set few of these
    done = launch(*options, "python", "-c", MARKER_APP, cwd=tmp_path, env=environ,
                  launcher=LAUNCHERS[launcher])
    assert done.returncode == 78, done.stderr
    assert one_line(done.stderr) == expected.format(cfg=config, dir=tmp_path)
    assert done.stdout == "" and not (tmp_path / "ran").exists()


def test_a_config_file_that_is_not_text_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "traced-run.yaml"
    config.write_bytes(b"timeout: 3\nservice_name: \xff\xfe\n")
    done = launch("python", "-c", MARKER_APP, cwd=tmp_path, env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 78
    assert one_line(done.stderr) == f"{config}:2: cannot read the config file: not UTF-8 text"
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config_file_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "team.yaml"
    config.write_text("timeout: 3\n")
    config.chmod(0)
    done = launch("--config", str(config), "true", cwd=tmp_path,
                  env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 78
    assert one_line(done.stderr) == f"{config}: cannot read the config file: Permission denied"


@pytest.mark.parametrize(("yaml_text", "env"), [
    (f"password: [{SECRET}]\n", {}),
    (f"headers: Bearer {SECRET}\n", {}),
    ("token: ${TOKEN}\ntimeout: x\n", {"TOKEN": SECRET}),
    (None, {"OTEL_EXPORTER_OTLP_HEADERS": f"Authorization Bearer {SECRET}"}),
    (None, {"MLFLOW_TRACKING_URI": f"ftp://alice:{SECRET}@mlflow.example.com"}),
    (None, {"MLFLOW_TRACKING_URI": f"https://alice:{SECRET}@mlflow.example.com:port"}),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://alice:p@ss{SECRET}@:4318"}),
    ("tracking_uri: https://alice:${PW}@\n", {"PW": SECRET}),
    (None, {"TRACED_RUN_REDACT": f"({SECRET})\\1"}),  # a pattern RE2 refuses: it may be the secret itself
])
def test_a_refusal_never_shows_a_secret(yaml_text: str | None, env: dict[str, str], tmp_path: Path) -> None:
    environ = clean_env(**{"MLFLOW_TRACKING_URI": UNUSED_URI, **env})
    if yaml_text is not None:
        (tmp_path / "team.yaml").write_text(yaml_text)
        environ["TRACED_RUN_CONFIG"] = str(tmp_path / "team.yaml")
    for argv in (["true"], ["config"]):
        done = launch(*argv, cwd=tmp_path, env=environ)
        assert done.returncode == 78
        message = one_line(done.stderr)
        assert SECRET not in message and SECRET not in done.stdout, message
        assert "(value hidden)" in message or "***@" in message or "timeout" in message, message


# -- env-only: the bootstrap on PYTHONPATH, no launcher -----------------------------------

STARTS = """
    print("app code ran", flush=True)
"""


@pytest.fixture(scope="module")
def boot_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    done = launch("--print-pythonpath", cwd=tmp_path_factory.mktemp("boot"))
    return done.stdout.strip()


def env_only(boot_dir: str, **extra: str) -> dict[str, str]:
    return clean_env(PYTHONPATH=boot_dir, MLFLOW_TRACKING_URI=UNUSED_URI, **extra)


@pytest.mark.parametrize("where", ["env", "yaml"])
def test_strict_mode_stops_the_app_before_its_code_runs(where: str, tmp_path: Path, boot_dir: str) -> None:
    (tmp_path / "app.py").write_text(STARTS.strip() + "\nimport pydantic_ai\n")
    extra = {"TRACED_RUN_STRICT": "true"}
    if where == "env":
        extra["OTEL_EXPORTER_OTLP_TIMEOUT"] = "abc"
        source = "env OTEL_EXPORTER_OTLP_TIMEOUT"
    else:
        (tmp_path / "team.yaml").write_text("timeout: abc\n")
        extra["TRACED_RUN_CONFIG"] = str(tmp_path / "team.yaml")
        source = f"{tmp_path / 'team.yaml'}:1"
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env_only(boot_dir, **extra),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == ""
    assert one_line(done.stderr) == (f"{source}: timeout: expected a number of seconds, got 'abc' "
                                     "(strict mode: not starting the app)")
    assert done.returncode == 78


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "fail-open"])
def test_no_tracking_uri_without_the_launcher_is_a_settings_line(
        strict: bool, tmp_path: Path, boot_dir: str) -> None:
    """Nowhere to send traces is a setting to fix, said as one, and in strict mode its exit code
    is the settings' (78), not the one of a pipeline that broke (70)."""
    (tmp_path / "app.py").write_text(STARTS.strip() + "\nimport pydantic_ai\n")
    env = clean_env(PYTHONPATH=boot_dir, **({"TRACED_RUN_STRICT": "true"} if strict else {}))
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    ending = "(strict mode: stopping the app)" if strict else "; the app runs untraced"
    assert one_line(done.stderr) == ("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or "
                                     f"tracking_uri in the config file{' ' if strict else ''}{ending}")
    assert done.returncode == (78 if strict else 0)
    assert done.stdout == "app code ran\n"


def test_strict_mode_with_valid_settings_runs_the_app(tmp_path: Path, boot_dir: str) -> None:
    (tmp_path / "app.py").write_text(STARTS.strip() + "\n")
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path,
                          env=env_only(boot_dir, TRACED_RUN_STRICT="true"),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "app code ran\n", "")


def test_without_strict_an_invalid_setting_leaves_the_app_running_untraced(
        tmp_path: Path, boot_dir: str) -> None:
    (tmp_path / "app.py").write_text(STARTS.strip() + "\n" + textwrap.dedent(AGENT_APP))
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path,
                          env=env_only(boot_dir, OTEL_EXPORTER_OTLP_TIMEOUT="abc"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'app code ran\n{"lookup":"a: sunny"}\n'
    assert one_line(done.stderr) == ("env OTEL_EXPORTER_OTLP_TIMEOUT: timeout: expected a number of "
                                     "seconds, got 'abc'; the app runs untraced")


# -- against the session's MLflow server ------------------------------------------------

MODULES_APP = AGENT_APP + """
    import sys
    print(sorted(m for m in sys.modules if m.startswith("traced_run")))
"""


@pytest.mark.parametrize(("options", "env"), [
    ([], {"TRACED_RUN_ENABLED": "false"}),
    ([], {"OTEL_SDK_DISABLED": "true"}),
    (["--disable"], {}),
], ids=["TRACED_RUN_ENABLED", "OTEL_SDK_DISABLED", "--disable"])
def test_the_kill_switch_runs_the_app_without_loading_or_sending_anything(
        options: list[str], env: dict[str, str], app: App) -> None:
    experiment_id = app.server.client().create_experiment(app.experiment)
    app.write(MODULES_APP)
    done = app.run(*options, "python", "app.py", env=app.env(**env))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    output, modules = done.stdout.decode().splitlines()
    assert output == '{"lookup":"a: sunny"}'
    loaded = ast.literal_eval(modules)
    assert "traced_run.bootstrap" in loaded, "the bootstrap ran, and stopped there"
    assert "traced_run.pipeline" not in loaded
    assert "traced_run.delivery" not in loaded

    # a negative check: the app has exited, so anything it sent would be there by now
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert app.server.traces(experiment_id) == []
        time.sleep(0.5)


def test_launcher_options_reach_the_app_and_beat_the_environment(app: App) -> None:
    experiment_id = app.server.client().create_experiment(f"{app.experiment}-by-id")
    app.write(AGENT_APP)
    # the environment names app.experiment; the option's id decides instead
    done = app.run("--experiment-id", experiment_id, "--service-name", "from-option", "python", "app.py",
                   env=app.env(OTEL_SERVICE_NAME="from-env", TRACED_RUN_EXIT_TIMEOUT=GENEROUS_EXIT))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    (trace,) = app.server.wait_traces(experiment_id, 1, by_name=False)
    assert trace.info.tags["service.name"] == "from-option"
    assert app.server.experiment_id(app.experiment) is None


def test_the_config_file_in_the_working_directory_reaches_the_app(app: App) -> None:
    (app.directory / "traced-run.yaml").write_text("service_name: from-yaml\ntags:\n  team: agents\n")
    app.write(AGENT_APP)
    done = app.run("python", "app.py", env=clean_env(MLFLOW_TRACKING_URI=app.server.url,
                                                     MLFLOW_EXPERIMENT_NAME=app.experiment,
                                                     TRACED_RUN_EXIT_TIMEOUT=GENEROUS_EXIT))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    (trace,) = app.traces(1)
    assert trace.info.tags["service.name"] == "from-yaml"
    assert trace.info.tags["team"] == "agents"


# -- never silent about running untraced (issue 25) ------------------------------------------


@pytest.fixture(scope="module")
def other_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Python of another environment, without traced-run."""
    directory = tmp_path_factory.mktemp("other-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=120)
    return str(directory / "bin" / "python")


@pytest.mark.parametrize("strict", [False, True], ids=["untraced", "strict"])
def test_another_environments_python_says_it_runs_untraced(strict: bool, other_python: str,
                                                           tmp_path: Path) -> None:
    done = launch(*(["--strict"] if strict else []), other_python, "-c", MARKER_APP, cwd=tmp_path,
                  env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    line = one_line(done.stderr)
    assert line.startswith(f"{other_python} cannot import traced_run: it is not installed in that "
                           "Python's environment; "), line
    if strict:
        assert done.returncode == 70 and "not starting the app (strict mode)" in line
        assert done.stdout == "" and not (tmp_path / "ran").exists()
    else:
        assert (done.returncode, done.stdout) == (0, "app ran\n") and "the app runs untraced" in line


@pytest.mark.parametrize(("flags", "letter"), [(["-E"], "E"), (["-Es"], "E"), (["-I"], "I"),
                                               (["-X", "dev", "-I"], "I"), (["-W", "ignore", "-S"], "S"),
                                               (["#!"], "E")],
                         ids=["-E", "-Es", "-I", "-X dev -I", "-W ignore -S", "#! python -E"])
@pytest.mark.parametrize("strict", [False, True], ids=["untraced", "strict"])
def test_python_options_that_skip_the_bootstrap_are_said(flags: list[str], letter: str, strict: bool,
                                                         tmp_path: Path) -> None:
    if flags == ["#!"]:
        (tmp_path / "app.py").write_text(f"#!{BIN / 'python'} -E\n{MARKER_APP}\n")
        (tmp_path / "app.py").chmod(0o755)
        command = ["./app.py"]
    else:
        command = ["python", *flags, "-c", MARKER_APP]
    done = launch(*(["--strict"] if strict else []), *command, cwd=tmp_path,
                  env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    line = one_line(done.stderr)
    assert f" -{letter} " in line and f"drop -{letter} to trace the app" in line, line
    if strict:
        assert done.returncode == 70 and line.endswith("; not starting the app (strict mode)")
        assert not (tmp_path / "ran").exists()
    else:
        assert (done.returncode, done.stdout) == (0, "app ran\n") and line.endswith("; the app runs untraced")
