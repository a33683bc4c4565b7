"""``traced-run [OPTIONS] COMMAND [ARGS...]``: prepare the environment, then
become the command (exec), so its pid, stdio, signals and exit code are its own.

This is the Python launcher: ``python -m traced_run``, the ``traced-run-py``
command, and where the shell launcher ``traced-run`` (scripts/traced-run) hands
over everything but its fast path (options, subcommands, a command that is not
a Python of the launcher's own environment). It checks the settings before
anything runs and refuses bad ones with one line and exit code 78; the options
reach the app's processes through ``TRACED_RUN_OPTIONS``, where they keep their
precedence over the environment.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from traced_run import __version__, report
from traced_run.bootstrap import BOOT_DIR
from traced_run.commands import uv
from traced_run.config.settings import SPECS
from traced_run.config.sources import Loaded, load, shown
from traced_run.flags import LAUNCHED_ENV, OPTIONS_ENV
from traced_run.startcheck import no_destination

EPILOG = """\
commands of its own:
  traced-run config [--example]   the effective settings with their sources, or a starter file
  traced-run flush                send the spooled batches now
  traced-run doctor [--json]      check settings, install and MLflow; send one trace end to end
  traced-run mlflow [--port P]    a local MLflow server for development (needs traced-run[mlflow])
exit codes: the command's own; 2 bad option; 70 (--strict) the command's Python cannot
load traced-run; 78 invalid settings; 126 command not executable; 127 command not found.
A program named like one of these, or like an option, runs after `--`: traced-run -- config."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        report.say(f"{message} (see traced-run --help)")
        raise SystemExit(report.EXIT_USAGE)


class _Once(argparse.Action):
    """An option given twice is a mistake (which one was meant?), not "the last wins"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"option {option_string} given twice")
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="traced-run",
        description="Run a command with every pydantic-ai agent run traced into MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"traced-run {__version__}")
    for name, spec in SPECS.items():
        if spec.option is None:
            continue
        env = f" [env: {', '.join(spec.env)}]" if spec.env else ""
        if spec.option_value is not None:
            parser.add_argument(spec.option, dest=name, action="store_const", const=spec.option_value,
                                help=spec.doc + env)
        else:
            parser.add_argument(spec.option, dest=name, metavar=spec.kind.name.upper().replace(" ", "_"),
                                action=_Once, help=spec.doc + env)
    parser.add_argument("--print-pythonpath", action="store_true",
                        help="print the directory to put on PYTHONPATH to trace without the launcher")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, e.g. python app.py")
    return parser


def child_environment(options: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The command's environment: our bootstrap first on PYTHONPATH, our options passed on."""
    env = dict(environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOT_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOT_DIR, *paths])
    if options:
        env[OPTIONS_ENV] = json.dumps(options)
    else:
        env.pop(OPTIONS_ENV, None)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.print_pythonpath:
        print(BOOT_DIR)
        return 0
    options = {name: getattr(args, name) for name, spec in SPECS.items()
               if spec.option is not None and getattr(args, name) is not None}
    if "config" in options:
        options["config"] = os.path.abspath(os.path.expanduser(options["config"]))
    env = child_environment(options, dict(os.environ))
    command = list(args.command)
    subcommand = SUBCOMMANDS.get(command[0]) if command else None
    if command[:1] == ["--"]:
        command = command[1:]
    elif subcommand is not None:
        return subcommand(command[1:], env)
    # Its notes are the app's to say, when it loads the settings: said here too, a line would be twice.
    loaded = _load(env)
    if loaded is None:
        return report.EXIT_CONFIG
    if not command:
        report.say("no command given: traced-run [OPTIONS] COMMAND [ARGS...] (see traced-run --help)")
        return report.EXIT_USAGE
    refusal = no_destination(loaded.settings)
    if refusal is not None:
        report.say(refusal)
        return report.EXIT_CONFIG
    skipped = _skips_the_bootstrap(command, env)
    if skipped is not None:
        what = "not starting the app (strict mode)" if loaded.settings.strict else "the app runs untraced"
        report.say(f"{skipped}; {what}")
        if loaded.settings.strict:
            return report.EXIT_SETUP
    uv_run = uv.with_traced_run(command)
    if uv_run is not None:
        # No LAUNCHED_ENV: the Pythons uv starts for itself (a build backend's, without
        # traced-run) would say they run untraced, and under --strict stop the build.
        return _exec(uv_run, env)
    # Checked here: no process checks again, but a Python of the command that cannot import
    # traced_run (another environment's, a #! interpreter's) says so (_boot/sitecustomize.py).
    env[LAUNCHED_ENV] = "0"
    return _exec(command, env)


_PYTHON = re.compile(r"python(\d+(\.\d+)?)?")
_SKIPPING = {"E": "ignores PYTHONPATH", "I": "ignores PYTHONPATH", "S": "skips site and sitecustomize"}


def _skips_the_bootstrap(command: list[str], env: dict[str, str]) -> str | None:
    """``python -E``/``-I``/``-S`` (also combined, ``-Es``, or on a ``#!`` line): the
    interpreter never loads the bootstrap, so nothing would say the app runs untraced."""
    interpreter, args = command[0], command[1:]
    if not _PYTHON.fullmatch(os.path.basename(interpreter)):
        script = shutil.which(interpreter, path=env.get("PATH"))
        try:
            with open(script or interpreter, "rb") as stream:
                first = stream.readline(256).decode("utf-8", "replace")
        except OSError:
            return None
        words = first[2:].split() if first.startswith("#!") else []
        if words[:1] and os.path.basename(words[0]) == "env":
            words = words[1:]
        if not (words and _PYTHON.fullmatch(os.path.basename(words[0]))):
            return None
        interpreter, args = f"{script or interpreter} (#!{' '.join(words)})", words[1:]
    given = iter(args)
    for arg in given:
        if not arg.startswith("-") or arg.startswith("--") or arg == "-":
            return None
        for index, letter in enumerate(arg[1:], 2):
            if letter in _SKIPPING:
                return (f"{interpreter} -{letter} {_SKIPPING[letter]}, where traced-run's bootstrap is: "
                        f"drop -{letter} to trace the app")
            if letter in "cm":  # the app's code or module follows
                return None
            if letter in "XW":  # the option's value: the rest of the word, else the next one
                if index == len(arg):
                    next(given, None)
                break
    return None


def _load(env: dict[str, str]) -> Loaded | None:
    try:
        return load(env)
    except report.ConfigError as error:
        report.say(str(error))
        return None


def _config(argv: list[str], env: dict[str, str]) -> int:
    parser = _Parser(prog="traced-run config", description="Print the effective settings as YAML, each "
                     "with the source that decided it (secrets masked).")
    parser.add_argument("--example", action="store_true",
                        help="print a documented starter config file (every setting at its default) instead")
    parser.add_argument("--reference", action="store_true", help="print the Markdown reference instead")
    args = parser.parse_args(argv)
    if args.example or args.reference:
        from traced_run.config import reference

        print(reference.example_config() if args.example else reference.markdown_reference(), end="")
        return 0
    loaded = _load(env)
    if loaded is None:
        return report.EXIT_CONFIG
    loaded.say_notes()
    for name, value in vars(loaded.settings).items():
        print(f"{name}: {shown(name, value)}  # {loaded.sources[name]}")
    return 0


def _flush(argv: list[str], env: dict[str, str]) -> int:
    parser = _Parser(prog="traced-run flush", description="Send the spooled batches for the configured "
                     "MLflow now; exit 1 when some are left. Batches written for other endpoints are listed.")
    parser.add_argument("--endpoint", metavar="URL", help="also send the batches written for URL (an old or "
                        "wrong MLflow address) to the configured MLflow, with its credentials")
    parser.add_argument("--drop-other-endpoints", action="store_true",
                        help="remove the batches written for any other endpoint than the configured one")
    parser.add_argument("--set-aside", action="store_true",
                        help="send again the batches MLflow refused, set aside in the spool's rejected/ "
                        "(once their cause is fixed)")
    args = parser.parse_args(argv)
    loaded = _load(env)
    if loaded is None:
        return report.EXIT_CONFIG
    loaded.say_notes()
    if not loaded.settings.traces_endpoint:
        from traced_run.transport import NO_TRACKING_URI

        report.say(NO_TRACKING_URI)
        return report.EXIT_CONFIG
    from traced_run.commands.flush import flush

    return flush(loaded.settings, args.endpoint, args.drop_other_endpoints, args.set_aside)


def _doctor(argv: list[str], env: dict[str, str]) -> int:
    from traced_run.commands import doctor

    return doctor.main(argv, env, _Parser)


def _mlflow(argv: list[str], env: dict[str, str]) -> int:
    from traced_run.commands import local_mlflow

    return local_mlflow.main(argv, _Parser)


SUBCOMMANDS: dict[str, Callable[[list[str], dict[str, str]], int]] = {
    "config": _config, "flush": _flush, "doctor": _doctor, "mlflow": _mlflow}
"""``traced-run NAME``: ours; a program of that name runs as ``traced-run -- NAME``."""


def _exec(command: list[str], env: dict[str, str]) -> int:
    if not command[0]:
        report.say("command not found: '' (the command name is empty)")
        return report.EXIT_NOT_FOUND
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        report.say(f"command not found: {command[0]}")
        return report.EXIT_NOT_FOUND
    except PermissionError:
        report.say(f"command not executable: {command[0]}")
        return report.EXIT_NOT_EXECUTABLE
    except OSError as error:
        if error.errno == errno.E2BIG:
            ours = len(env.get(OPTIONS_ENV, "")) + len(BOOT_DIR) + 1
            report.say(f"cannot run {command[0]}: its arguments and environment together are more than "
                       f"the system allows (Argument list too long); traced-run adds {ours} bytes of it "
                       f"(PYTHONPATH, {OPTIONS_ENV})")
        else:
            report.say(f"cannot run {command[0]}: {error.strerror or error}")
        return report.EXIT_NOT_EXECUTABLE


