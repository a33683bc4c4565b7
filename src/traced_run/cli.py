"""``traced-run [OPTIONS] COMMAND [ARGS...]``: prepare the environment, then
become the command (exec), so its pid, stdio, signals and exit code are its own.

The launcher checks the settings before anything runs and refuses bad ones
with one line and exit code 78; the options reach the app's processes through
``TRACED_RUN_OPTIONS``, where they keep their precedence over the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from traced_run import __version__, report
from traced_run.bootstrap import BOOT_DIR
from traced_run.settings import SPECS
from traced_run.sources import OPTIONS_ENV, load, shown

EPILOG = """\
exit codes: the command's own; 2 bad option; 78 invalid settings;
126 command not executable; 127 command not found.
A command named like an option can follow `--`: traced-run -- --weird-name."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        report.say(f"{message} (see traced-run --help)")
        raise SystemExit(report.EXIT_USAGE)


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
                                help=spec.doc + env)
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective settings and their sources (secrets masked), then exit")
    parser.add_argument("--print-pythonpath", action="store_true",
                        help="print the directory to put on PYTHONPATH to trace without the launcher")
    parser.add_argument("--example-config", action="store_true",
                        help="print a documented config file with every setting at its default, then exit")
    parser.add_argument("--settings-reference", action="store_true", help=argparse.SUPPRESS)
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
    if args.example_config or args.settings_reference:
        from traced_run import reference

        print(reference.example_config() if args.example_config else reference.markdown_reference(), end="")
        return 0
    options = {name: getattr(args, name) for name, spec in SPECS.items()
               if spec.option is not None and getattr(args, name) is not None}
    if "config" in options:
        options["config"] = os.path.abspath(options["config"])
    env = child_environment(options, dict(os.environ))
    try:
        loaded = load(env)
    except report.ConfigError as error:
        report.say(str(error))
        return report.EXIT_CONFIG
    if args.show_config:
        for name, value in vars(loaded.settings).items():
            print(f"{name}: {shown(name, value)}  # {loaded.sources[name]}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        report.say("no command given: traced-run [OPTIONS] COMMAND [ARGS...] (see traced-run --help)")
        return report.EXIT_USAGE
    if loaded.settings.enabled and not loaded.settings.traces_endpoint:
        report.say("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or tracking_uri "
                   "in the config file")
        return report.EXIT_CONFIG
    return _exec(command, env)


def _exec(command: list[str], env: dict[str, str]) -> int:
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        report.say(f"command not found: {command[0]}")
        return report.EXIT_NOT_FOUND
    except PermissionError:
        report.say(f"command not executable: {command[0]}")
        return report.EXIT_NOT_EXECUTABLE
    except OSError as error:
        report.say(f"cannot run {command[0]}: {error.strerror or error}")
        return report.EXIT_NOT_EXECUTABLE


