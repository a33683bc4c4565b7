"""The courier (issue 15): a busy traced process hands its batches to one process
of its own, named in ``ps``, that does the per-span work off the app's GIL. Real
apps under ``traced-run``, the real MLflow (behind the fault proxy where a test
needs a fault): nothing is lost when the courier dies or MLflow hangs, the
courier never outlives its app, and a forked child never writes to its
parent's courier."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator

import pytest
from conftest import App, MlflowServer, poll, traced_env
from faultproxy import FaultProxy, fault_proxy
from realservers import AuthMlflow, auth_mlflow, client_env, mtls_mlflow, pki
from test_delivery import (
    EXIT_TIMEOUT,
    MARGIN,
    RUN_SPANS,
    Lines,
    finished,
    flush,
    proxied_env,
    run_numbers,
    spool_of,
    spooled,
    start,
    stop,
    tool_agent,
    trace_infos,
    traced_lines,
    wait_runs,
)
from test_exit_hanging import AT_ONCE
from tls import Pki, TlsProxy

from traced_run.delivery.courier import PROCESS_MODULE

COURIERS = """
    import os
    import time

    def couriers():
        \"\"\"This process's children: (pid, command line, name, CPU seconds they have used, nice).\"\"\"
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                if fields[1] != str(os.getpid()):
                    continue
                with open(f"/proc/{pid}/cmdline") as cmdline, open(f"/proc/{pid}/comm") as comm:
                    found.append((int(pid), cmdline.read().split("\\0")[:-1], comm.read().strip(),
                                  (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
                                  int(fields[16])))
            except OSError:  # ended meanwhile
                pass
        return found

    def busy(prefix, first=0, after=3):
        \"\"\"Runs until this process has had a courier for ``after`` s (it takes a batch a
        second); the next run's number.\"\"\"
        i, since, deadline = first, None, time.monotonic() + 60
        while since is None or time.monotonic() < since + after:
            agent.run_sync(f"{prefix} {i}")
            i += 1
            if since is None and couriers():
                since = time.monotonic()
            if time.monotonic() > deadline:
                raise SystemExit("no courier within 60 s")
        return i

    def signal_courier(prefix, name, runs):
        \"\"\"Busy until the courier is up, sends it signal ``name``, then ``runs`` more runs;
        prints how many runs there were in all.\"\"\"
        import signal

        i = busy(prefix)
        (courier, *_), = couriers()
        os.kill(courier, getattr(signal, name))
        for i in range(i, i + runs):
            agent.run_sync(f"{prefix} {i}")
        print(i + 1, flush=True)
"""


__all__ = ["auth_mlflow", "mtls_mlflow", "pki"]


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    with fault_proxy(mlflow_server.url) as running:
        yield running


def running_couriers(app_pid: int) -> list[int]:
    """Processes anywhere on the machine that are ``app_pid``'s courier."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if PROCESS_MODULE.encode() in argv and str(app_pid).encode() in argv:
            found.append(int(pid))
    return found


def test_a_busy_process_has_one_named_courier_that_ends_with_it_and_loses_nothing(app: App) -> None:
    """The courier takes the batches once it is up (it works on them: the CPU it has used
    grows between two looks 2.5 s apart), shows in ``ps`` with the app's pid, and
    is gone when the app is; every run arrives whole, and the app's stdout and stderr
    hold only what the app wrote."""
    app.write(tool_agent("busy", COURIERS, """
    import json

    i = busy("busy")
    first, until = couriers(), time.monotonic() + 2.5  # a batch goes every second
    while time.monotonic() < until:
        agent.run_sync(f"busy {i}")
        i += 1
    print(json.dumps({"pid": os.getpid(), "runs": i, "first": first, "last": couriers()}))
    """))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    (line,) = done.stdout.decode().splitlines()  # the app's one line, nothing of traced-run's
    seen = json.loads(line)
    assert len(seen["first"]) == 1 and len(seen["last"]) == 1, seen
    courier, argv, name, cpu_before, nice = seen["first"][0]
    assert argv[1:] == ["-S", "-m", PROCESS_MODULE, str(seen["pid"])] and name == "traced-courier", seen
    assert nice == os.nice(0) + 10, "the courier yields the CPU to the app it works for"
    assert seen["last"][0][0] == courier
    cpu_since = seen["last"][0][3] - cpu_before
    print(f"the courier used {cpu_since:.2f} s of CPU over the last 2.5 s of runs")
    assert cpu_since >= 0.05, "the courier took no batches once it was up (an idle one uses no CPU)"
    poll(lambda: not running_couriers(seen["pid"]), timeout=10, what="the courier to end with its app")
    wait_runs(app.server, app.experiment, "busy", seen["runs"])


def test_a_courier_that_dies_loses_nothing_and_is_told_once(app: App) -> None:
    """The courier is killed (the OOM killer, a ``pkill``) while the app runs: the
    app sends its batches itself from then on, loses none, and says so in one line."""
    app.write(tool_agent("orphaned", COURIERS, """
    signal_courier("orphaned", "SIGKILL", 60)
    """))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    runs = int(done.stdout)
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"traced-run: the courier process \(pid \d+\) stopped \(it is gone( \(.+\))?\); this process sends "
        r"its traces itself from now on", lines[0]), lines
    wait_runs(app.server, app.experiment, "orphaned", runs)


def test_the_courier_ends_when_its_app_is_killed(app: App) -> None:
    """SIGKILL leaves no exit path to stop the courier: it ends by itself."""
    app.write(tool_agent("killed", COURIERS, """
    import signal

    busy("killed")
    print(os.getpid(), [pid for pid, *_ in couriers()], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == -signal.SIGKILL
    pid, couriers = done.stdout.decode().split(" ", 1)
    assert len(json.loads(couriers)) == 1, couriers
    poll(lambda: not running_couriers(int(pid)), timeout=10, what="the courier to end with its killed app")


def test_forked_children_have_couriers_of_their_own(app: App) -> None:
    """A child forked once the parent's courier is up never writes to it (a stray request
    would break the parent's): a busy child starts its own, and every run of parent and
    children arrives whole, with nothing said."""
    app.write(tool_agent("forked", COURIERS, """
    import json

    i = busy("parent")
    parents = couriers()
    children = []
    for child in range(2):
        pid = os.fork()
        if pid == 0:
            runs = busy(f"child{child}")
            print(json.dumps({"pid": os.getpid(), "prefix": f"child{child}", "runs": runs,
                              "couriers": couriers()}), flush=True)
            os._exit(0)
        children.append(pid)
    for i in range(i, i + 40):
        agent.run_sync(f"parent {i}")
    for pid in children:
        os.waitpid(pid, 0)
    print(json.dumps({"pid": os.getpid(), "prefix": "parent", "runs": i + 1,
                      "couriers": parents + couriers()}), flush=True)
    """))
    # Three processes run flat out against one MLflow on a loaded machine: it falls behind,
    # and past half the default queue batches would take the spool and say so. That is
    # test_delivery's subject; here a deep queue keeps them in memory.
    done = app.run("python", "app.py", env=traced_env(app, TRACED_RUN_QUEUE_SIZE="65536"))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    seen = [json.loads(line) for line in done.stdout.decode().splitlines()]
    print({process["prefix"]: process["runs"] for process in seen})
    assert sorted(process["prefix"] for process in seen) == ["child0", "child1", "parent"], seen
    for process in seen:
        owned = {courier for courier, argv, *_ in process["couriers"] if argv[-1] == str(process["pid"])}
        assert len(owned) == 1, process

    def all_arrived() -> bool:
        # Each process numbers its own runs: a parent slowed by a loaded machine makes
        # over a thousand, and its numbers must not run into a child's.
        infos = [info for info in trace_infos(app.server, app.experiment) if finished(info)]
        return len(infos) == sum(process["runs"] for process in seen) and all(
            run_numbers(infos, process["prefix"]) == list(range(process["runs"])) for process in seen)

    poll(all_arrived, timeout=60, what="every run of the parent and of both children, once")


def test_leaving_an_mlflow_that_hangs_with_the_courier_up_is_at_once_and_loses_nothing(
        app: App, proxy: FaultProxy) -> None:
    """MLflow hangs once the courier is up: the courier's post times out, the app knows
    MLflow hangs and leaves at once; what it holds goes to the spool, and a flush sends all."""
    app.write(tool_agent("hung", COURIERS, """
    i = busy("hung")
    print(f"busy {i}", flush=True)
    while not os.path.exists("stop") and i < 2000:
        agent.run_sync(f"hung {i}")
        print(f"done {i}", flush=True)
        i += 1
        time.sleep(0.05)
    print(f"stopped {i}", flush=True)
    """))
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT), OTEL_EXPORTER_OTLP_TIMEOUT="2")
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        out.first("busy ")
        proxy.mode = "hang"
        poll(lambda: proxy.count(path="/", mode="hang") >= 2, timeout=60, what="a post that timed out")
        (app.directory / "stop").touch()
        runs = int(out.first("stopped ").split()[1])
        err, exit_took = out.finish_timed(timeout=60)
    finally:
        stop(process)
    print(f"exit took {exit_took:.2f}s; {runs} runs; stderr: {err.decode().strip()}")
    assert process.returncode == 0, err.decode()
    assert exit_took < AT_ONCE, f"the exit waited {exit_took:.2f}s for a hanging MLflow"
    lines = traced_lines(err)
    assert len(lines) == 1 and "not delivered" in lines[0] and "courier" not in lines[0], lines
    assert spooled(spool_of(app))
    proxy.mode = "forward"
    flush(app, proxied_env(app, proxy))
    wait_runs(app.server, app.experiment, "hung", runs)


def test_a_courier_that_stops_answering_does_not_hold_the_exit(app: App) -> None:
    """The courier is stopped (SIGSTOP: it neither answers nor dies) while a batch is with
    it: the exit still keeps its bound, the batch the courier held goes to the spool,
    and a flush sends every run."""
    app.write(tool_agent("stuck", COURIERS, """
    signal_courier("stuck", "SIGSTOP", 150)
    """))
    env = traced_env(app, exit_timeout=str(EXIT_TIMEOUT))
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        runs = int(out.first(""))
        err, exit_took = out.finish_timed(timeout=60)
    finally:
        stop(process)
    print(f"exit took {exit_took:.2f}s; {runs} runs; stderr: {err.decode().strip()}")
    assert process.returncode == 0, err.decode()
    assert exit_took < EXIT_TIMEOUT + MARGIN, f"the exit waited {exit_took:.2f}s for a stopped courier"
    lines = traced_lines(err)
    assert len(lines) == 1 and "not delivered" in lines[0], lines
    # The courier, not MLflow, is what did not answer: the line must not blame MLflow alone.
    assert re.search(r"\(no answer from the courier process \(pid \d+\) posting to MLflow within "
                     rf"exit_timeout={EXIT_TIMEOUT:g}s\)", lines[0]), lines
    flush(app, traced_env(app))
    wait_runs(app.server, app.experiment, "stuck", runs)


def test_the_courier_reaches_mlflow_over_mutual_tls_with_relative_certificate_paths(
        app: App, mtls_mlflow: TlsProxy, pki: Pki) -> None:
    """The courier runs from ``/``: certificate paths relative to the app's directory
    still name the app's files."""
    certs = app.directory / "certs"
    certs.mkdir()
    for source in (pki.ca_cert, pki.client_cert, pki.client_key):
        shutil.copy(source, certs / source.name)
    app.write(tool_agent("mtls", COURIERS, """
    i = busy("mtls")
    print(i, flush=True)
    """))
    env = traced_env(app, MLFLOW_TRACKING_URI=mtls_mlflow.url,
                     MLFLOW_TRACKING_SERVER_CERT_PATH=f"certs/{pki.ca_cert.name}",
                     OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE=f"certs/{pki.client_cert.name}",
                     OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY=f"certs/{pki.client_key.name}")
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    wait_runs(app.server, app.experiment, "mtls", int(done.stdout))


def test_the_courier_sends_with_the_apps_credentials(app: App, auth_mlflow: AuthMlflow) -> None:
    """With authentication on, the courier's posts carry the app's credentials, handed to it
    over its socket: never in its command line, which every user of the machine can read.
    (The user makes the experiment first: basic-auth checks a password hash per request,
    and a busy app's first post would otherwise wait for three of them.)"""
    user, password = auth_mlflow.user()
    credentials = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    with client_env(**credentials):
        experiment_id = str(auth_mlflow.server.client().create_experiment(app.experiment))
    app.write(tool_agent("auth", COURIERS, f"""
    i = busy("auth", after=1)
    (pid, argv, *_), = couriers()
    print(i, any({password!r} in arg for arg in argv), flush=True)
    """))
    env = traced_env(app, experiment=False, MLFLOW_TRACKING_URI=auth_mlflow.url,
                     MLFLOW_EXPERIMENT_ID=experiment_id, **credentials)
    done = app.run("python", "app.py", env=env)
    # MLflow may fall behind this busy app, which then says it spooled some traces and sent
    # them later. Anything else is a failure.
    lines = traced_lines(done.stderr)
    assert done.returncode == 0 and all(line.endswith(" and sent later") for line in lines), lines
    runs, leaked = done.stdout.decode().split()
    assert leaked == "False"
    poll(lambda: stored(auth_mlflow, experiment_id) >= int(runs), timeout=120, what=f"{runs} traces")
    assert stored(auth_mlflow, experiment_id) == int(runs)


def stored(auth_mlflow: AuthMlflow, experiment_id: str) -> int:
    """Traces in the experiment, however many (a busy app under load makes over a thousand:
    MLflow's search pages through them; without their spans, which are not needed here)."""
    import mlflow

    with auth_mlflow.as_admin():
        mlflow.set_tracking_uri(auth_mlflow.url)
        return len(mlflow.search_traces(locations=[experiment_id], max_results=100_000, include_spans=False,
                                        return_type="list"))


def test_courier_false_keeps_all_the_work_in_the_apps_process(app: App) -> None:
    """``courier: false`` (a container whose memory limit has no room for a second
    interpreter): a busy process starts no courier and delivers every run itself."""
    app.write(tool_agent("alone", COURIERS, """
    until = time.monotonic() + 4  # four batches' worth, well past the courier's start
    i = 0
    while time.monotonic() < until:
        agent.run_sync(f"alone {i}")
        i += 1
    print(i, len(couriers()))
    """))
    done = app.run("python", "app.py", env=traced_env(app, TRACED_RUN_COURIER="false"))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    runs, couriers = map(int, done.stdout.split())
    assert couriers == 0
    wait_runs(app.server, app.experiment, "alone", runs)


def test_a_process_that_is_not_busy_starts_no_courier(app: App) -> None:
    """About twenty runs a second (80 spans) for 4 s: more spans than a busy second holds
    in all, but never 128 a second; the app's own process delivers them, and no second
    interpreter's memory is spent."""
    app.write(tool_agent("calm", COURIERS, """
    until = time.monotonic() + 4
    i = 0
    while time.monotonic() < until:
        agent.run_sync(f"calm {i}")
        i += 1
        time.sleep(0.04)
    print(i, len(couriers()))
    """))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    runs, couriers = map(int, done.stdout.split())
    print(f"{runs} runs, {runs * RUN_SPANS} spans in 4 s, {couriers} couriers")
    assert couriers == 0
    wait_runs(app.server, app.experiment, "calm", runs)


def test_an_app_with_over_a_thousand_open_files_gets_its_courier_all_the_same(app: App) -> None:
    """A server with many connections: the courier's socket is then above descriptor
    1023, which ``select()`` cannot watch; nothing is lost or said."""
    app.write(tool_agent("files", COURIERS, """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(4096, hard)), hard))
    held = [open(os.devnull) for _ in range(1100)]
    i = busy("files")
    (courier, *_), = couriers()
    print(i, max(file.fileno() for file in held), flush=True)
    """))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    runs, highest = map(int, done.stdout.split())
    assert highest > 1023
    wait_runs(app.server, app.experiment, "files", runs)
