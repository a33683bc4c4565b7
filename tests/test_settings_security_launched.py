"""Hostile settings (issue 16) through real processes: the launcher and the env-only
bootstrap, since what the user sees (exit code, the one stderr line, the app still
running) is the promise. The in-process half is tests/unit/test_settings_security.py."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import AGENT_APP, TRACED_RUN, clean_env
from support.hostile import DEEP, NOT_UTF8, SECRET, ignored_line
from support.settings import error_of

from traced_run.config.sources import OPTIONS_ENV

# No ./traced-run.yaml is found by accident: each test runs in an empty directory.
pytestmark = pytest.mark.usefixtures("cwd")

UNUSED_URI = "http://127.0.0.1:9"


def launch(*argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRACED_RUN, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("traced-run: "), stderr
    return lines[0].removeprefix("traced-run: ")


def test_config_and_the_doctor_say_the_file_is_ignored(cwd: Path) -> None:
    config = cwd / "traced-run.yaml"
    config.write_text("spool_dir: ./spool\n")
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI)
    shown = launch("config", cwd=cwd, env=env)
    assert shown.returncode == 0 and one_line(shown.stderr) == ignored_line(config, 1, "spool_dir")
    assert "config: null  # default" in shown.stdout and "./spool" not in shown.stdout
    doctor = launch("doctor", "--no-trace", cwd=cwd, env=env)
    assert f"WARN config file: {ignored_line(config, 1, 'spool_dir')}\n" in doctor.stdout
    assert doctor.stderr == ""


CATASTROPHIC = """
    import time
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    started = time.monotonic()
    agent = Agent(TestModel(custom_output_text="a" * 40 + "!"))
    print(agent.run_sync("a" * 40 + "!").output[-1], round(time.monotonic() - started))
"""


@pytest.mark.parametrize("how", ["launcher", "env-only"])
def test_a_cloned_repositorys_catastrophic_pattern_does_not_hang_the_app(how: str, cwd: Path) -> None:
    """A pattern that backtracks for ever on 40 a's: the file is ignored, the app finishes,
    and one line names the file."""
    config = cwd / "traced-run.yaml"
    config.write_text("trace_name: from-the-repo\nredact: ['(a+)+$']\n")
    (cwd / "app.py").write_text(textwrap.dedent(CATASTROPHIC))
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI, TRACED_RUN_EXIT_TIMEOUT="1")
    if how == "launcher":
        done = launch("--strict", "python", "app.py", cwd=cwd, env=env)
    else:
        boot = launch("--print-pythonpath", cwd=cwd, env=env).stdout.strip()
        done = subprocess.run([sys.executable, "app.py"], cwd=cwd, capture_output=True, text=True,
                              timeout=120, env={**env, "PYTHONPATH": boot})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("! "), done.stdout
    lines = done.stderr.splitlines()
    assert lines[0] == f"traced-run: {ignored_line(config, 2, 'redact')}", done.stderr
    # the spans were made, and not delivered to the closed port: a line of its own says so
    assert len(lines) == 2 and "not delivered" in lines[1], done.stderr


def test_config_doctor_exit_line_and_spool_never_show_a_password_of_the_url(cwd: Path) -> None:
    """The user's view of a tracking URI with a password (finding 5): ``config``,
    the doctor, and an app whose batch ends in the spool (closed port)."""
    url = f"http://alice:pa%20ss{SECRET}@127.0.0.1:9"
    env = clean_env(MLFLOW_TRACKING_URI=url, TRACED_RUN_SPOOL_DIR=str(cwd / "spool"),
                    TRACED_RUN_EXIT_TIMEOUT="1")
    shown = launch("config", cwd=cwd, env=env)
    assert shown.returncode == 0 and shown.stderr == ""
    assert "tracking_uri: \"http://127.0.0.1:9\"" in shown.stdout and "username: \"alice\"" in shown.stdout
    doctor = launch("doctor", "--no-trace", cwd=cwd, env=env)
    (cwd / "app.py").write_text(textwrap.dedent(AGENT_APP))
    ran = launch("python", "app.py", cwd=cwd, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "not delivered to http://127.0.0.1:9/v1/traces" in ran.stderr
    spooled = b"".join(p.read_bytes() for p in (cwd / "spool").rglob("*") if p.is_file())
    assert spooled, "the batch was spooled"
    basic = base64.b64encode(f"alice:pa ss{SECRET}".encode()).decode()
    for text in (shown.stdout, doctor.stdout, doctor.stderr, ran.stderr, spooled.decode("latin-1")):
        assert SECRET not in text and "pa%20ss" not in text and basic not in text


def test_options_json_nested_too_deep_is_a_damaged_variable(cwd: Path) -> None:
    deep = "[" * 60_000 + "]" * 60_000  # within the 128 KiB an environment variable may hold
    assert error_of({OPTIONS_ENV: deep}) == f"env {OPTIONS_ENV}: not the JSON the launcher writes"
    boot = launch("--print-pythonpath", cwd=cwd, env=clean_env()).stdout.strip()
    done = subprocess.run([sys.executable, "-c", "print('ran')"], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=clean_env(PYTHONPATH=boot, **{OPTIONS_ENV: deep}))
    assert (done.returncode, done.stdout, done.stderr) == (0, "ran\n", "")


def test_env_only_a_hostile_file_leaves_the_app_running_untraced(cwd: Path) -> None:
    boot = launch("--print-pythonpath", cwd=cwd, env=clean_env()).stdout.strip()
    (cwd / "traced-run.yaml").write_text(DEEP)
    (cwd / "app.py").write_text(textwrap.dedent(AGENT_APP))
    done = subprocess.run([sys.executable, "app.py"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHONPATH=boot, MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"lookup":"a: sunny"}\n'
    assert one_line(done.stderr).endswith("; the app runs untraced")


def test_the_launcher_refuses_a_header_with_exit_78(cwd: Path) -> None:
    done = launch("true", cwd=cwd, env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI,
                                                 OTEL_EXPORTER_OTLP_TRACES_HEADERS=f"x-k={SECRET}%0D%0Ax"))
    assert done.returncode == 78
    assert SECRET not in one_line(done.stderr)


def test_a_repeated_option_and_an_empty_command_are_one_line_each(cwd: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI=UNUSED_URI)
    (cwd / "a.yaml").write_text("timeout: 3\n")
    done = launch("--config", "a.yaml", "--config", "a.yaml", "true", cwd=cwd, env=env)
    assert done.returncode == 2
    assert one_line(done.stderr) == "option --config given twice (see traced-run --help)"
    done = launch("", cwd=cwd, env=env)
    assert done.returncode == 127
    assert one_line(done.stderr) == "command not found: '' (the command name is empty)"


def test_argument_list_too_long_says_what_traced_run_added(cwd: Path) -> None:
    # An argument longer than Linux's MAX_ARG_STRLEN (128 KiB): exec fails with E2BIG.
    code = ("import sys; from traced_run.commands.cli import main; "
            "sys.exit(main(['--service-name', 'svc', 'true', 'a' * 200_000]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 126
    line = one_line(done.stderr)
    assert line.startswith("cannot run true: its arguments and environment together are more than the "
                           "system allows (Argument list too long); traced-run adds "), line
    assert line.endswith(f" bytes of it (PYTHONPATH, {OPTIONS_ENV})")


def test_env_only_no_error_of_ours_reaches_the_apps_import(cwd: Path) -> None:
    """Not only a hostile file: whatever traced-run raises while it sets up (here a
    RecursionError, planted by a user sitecustomize) is one line, and the app runs."""
    boot = launch("--print-pythonpath", cwd=cwd, env=clean_env()).stdout.strip()
    (cwd / "user").mkdir()
    (cwd / "user" / "sitecustomize.py").write_text(textwrap.dedent("""
        import traced_run.pipeline

        def install(*args):
            raise RecursionError("maximum recursion depth exceeded")

        traced_run.pipeline.install = install
    """))
    (cwd / "app.py").write_text(textwrap.dedent(AGENT_APP))
    done = subprocess.run([sys.executable, "app.py"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHONPATH=f"{boot}{os.pathsep}{cwd / 'user'}",
                                        MLFLOW_TRACKING_URI=UNUSED_URI))
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"lookup":"a: sunny"}\n'
    assert one_line(done.stderr) == ("could not set up tracing: RecursionError: maximum recursion depth "
                                     "exceeded; the app runs untraced")


@pytest.mark.parametrize(("var", "value"), [("MLFLOW_EXPERIMENT_NAME", NOT_UTF8),
                                            ("MLFLOW_EXPERIMENT_ID", "\uff11\uff12"),
                                            ("MLFLOW_EXPERIMENT_ID", "\u0661\u0662")])
def test_the_launcher_refuses_a_value_that_can_never_be_sent(var: str, value: str, cwd: Path) -> None:
    done = launch("--strict", "python", "-c", "open('ran', 'w').close()", cwd=cwd,
                  env=clean_env(MLFLOW_TRACKING_URI=UNUSED_URI, **{var: value}))
    assert done.returncode == 78
    line = one_line(done.stderr)
    assert line.startswith(f"env {var}: "), line
    assert "expected UTF-8 text" in line or "expected a numeric MLflow experiment id (digits 0-9)" in line
    assert not (cwd / "ran").exists() and done.stdout == ""


SECRET_FORMS = {
    # form: (the variable, its value; whether the settings are refused)
    "a password pasted into the user name": ("MLFLOW_TRACKING_USERNAME", f"bob:{SECRET}", True),
    "a URL password holding ://": ("MLFLOW_TRACKING_URI", f"http://bob:{SECRET}://x@127.0.0.1:9", True),
    "a URL password holding =x://": ("MLFLOW_TRACKING_URI", f"http://bob:{SECRET}=b://x@127.0.0.1:9", True),
    "a literal secret as a redaction pattern": ("TRACED_RUN_REDACT", f"{SECRET},sk-[a-z]+", False),
    "a malformed redaction pattern": ("TRACED_RUN_REDACT", f"({SECRET}", True),
    "a redaction pattern of a named file": ("TRACED_RUN_CONFIG", "{named}", False),
}


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_a_secret_in_the_wrong_place_is_in_no_output_and_no_file(form: str, tmp_path: Path) -> None:
    """config, the doctor and a --strict start each see the setting; none shows the secret, and
    nothing traced-run writes (spool, cache under HOME) holds it."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    named = tmp_path / "team.yaml"
    named.write_text(f"redact: ['{SECRET}']\n")
    var, value, refused = SECRET_FORMS[form]
    env = clean_env(HOME=str(home), TRACED_RUN_SPOOL_DIR=str(home / "spool"),
                    **{var: value.format(named=named)})
    env.setdefault("MLFLOW_TRACKING_URI", UNUSED_URI)
    runs = [launch("config", cwd=work, env=env), launch("doctor", "--no-trace", cwd=work, env=env),
            launch("--strict", "python", "-c", "pass", cwd=work, env=env)]
    for done in runs:
        assert "Traceback" not in done.stderr
        assert SECRET not in done.stdout + done.stderr, (form, done.stdout, done.stderr)
    written = [p for root in (home, work) for p in root.rglob("*") if p.is_file()]
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    started = runs[2]
    assert started.returncode == (78 if refused else 0), started.stderr
    if refused:
        assert one_line(started.stderr).startswith(f"env {var}: ")
    else:
        assert '"***"' in runs[0].stdout
