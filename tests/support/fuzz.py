"""Cases for the settings loader's fuzz (tests/unit/test_settings_fuzz.py, in process;
tests/test_settings_fuzz_launched.py, through the launcher): random YAML documents,
random environment values and launcher options, some well-formed, most not, with a
secret planted where secrets go (password, token, header values, a URL's
credentials, a ``${VAR}`` those reference). Seeded: a case is its index."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from traced_run.config.settings import SPECS
from traced_run.config.sources import OPTIONS_ENV

SECRET = "Zq9secretZq9"


SEED = 16


KEYS = [name for name, spec in SPECS.items() if spec.in_yaml] + ["tracking_url", "colour"]


SECRET_KEYS = ["password", "token"]


SETTING_OF = {var: name for name, spec in SPECS.items() for var in (*spec.env, *spec.env_off)
              if var != "TRACED_RUN_CONFIG"}


ENV_VARS = list(SETTING_OF)


OPTIONS = [name for name, spec in SPECS.items() if spec.option]


ODD = ["", " ", "\t", "%", "%zz", "%0D%0A", "%ff", "@", ":", "/", "?", "#", "=", ",", "${", "}", "\\", "'",
       '"', "[", "]", "{", "}", "&a", "*a", "!!python/object:os.system", "~", "\u2028", "\u20ac", "é",
       "\x00", "\x07", "\x1b[31m", "\r", "\n", "\r\n x", "-", "0", "1e999", "nan", "true", "no", "null"]


def text(rng: random.Random) -> str:
    """A short string of odd pieces and ordinary letters, sometimes long."""
    pieces = [rng.choice(ODD) if rng.random() < 0.4 else rng.choice(["abc", "x", "mlflow", "9", "A-b_c"])
              for _ in range(rng.randint(0, 6))]
    if rng.random() < 0.05:
        pieces.append("y" * rng.choice([999, 1001, 5000, 300_000]))
    return "".join(pieces)


def url(rng: random.Random, secret: bool) -> str:
    scheme = rng.choice(["http://", "https://", "ftp://", "http:/", ""])
    userinfo = rng.choice([f"alice:{SECRET}@", f"al ice:pa ss{SECRET}@", f"{SECRET}@", f":{SECRET}@",
                           f"a:p%40{SECRET}@", f"a:{SECRET}\r\n@"]) if secret else rng.choice(["", "bob@"])
    host = rng.choice(["mlflow", "127.0.0.1", "[::1]", "", "h" * 300, "mlflow.example.com"])
    port = rng.choice(["", ":5000", ":port", ":99999", ":"])
    tail = rng.choice(["", "/", "/v1/traces", "/?q=1", "#f", "/a b", "/%zz"])
    return scheme + userinfo + host + port + tail


def value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 10 and roll < 0.12:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 10 and roll < 0.24:
        return {text(rng) or "k": value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([text(rng), rng.randint(-5, 10**6), rng.random() * 10, True, False, None,
                       url(rng, secret=False), "${PLAIN}", "${MISSING}"])


def plausible(rng: random.Random, name: str) -> str:
    """A value of the setting's kind that may well be valid, so that the loader
    gets past the first wrong value often enough to meet the rest."""
    kind = SPECS[name].kind.name
    choices = {"bool": ["true", "false", "1", "off"], "seconds": ["2.5", "10"], "count": ["100", "1"],
               "2..6": ["3"], "0..1": ["0.5", "1"], "gzip|deflate|none": ["gzip", "none"],
               "otlp|mlflow": ["otlp"], "experiment id": ["12"], "run id": ["abc123"],
               "mapping": ["k=v,k2=v%2C2", "x-a=1"], "list of regexes": ["a+,b{1,2}"],
               "path": ["~/x", "/tmp/s"],
               "url": [url(rng, secret=False), "http://127.0.0.1:5000"]}
    return rng.choice(choices.get(kind, ["svc", "agents", "A b"]))


def secret_value(rng: random.Random) -> Any:
    return rng.choice([SECRET, f"{SECRET}\r\nX: 1", f"{SECRET} {text(rng)}", "${S}",
                       f"pre-${{S}}-{text(rng)}", [SECRET], {"k": SECRET}, f"{SECRET}\u20ac"])


def render(item: Any, rng: random.Random) -> str:
    """Flow-style YAML, with the odd anchor, alias or tag."""
    if isinstance(item, list):
        out = "[" + ", ".join(render(x, rng) for x in item) + "]"
    elif isinstance(item, dict):
        out = "{" + ", ".join(f"{json.dumps(k)}: {render(v, rng)}" for k, v in item.items()) + "}"
    elif isinstance(item, str) and rng.random() < 0.5:
        out = json.dumps(item)  # a JSON string is a YAML double-quoted one
    elif item is None:
        out = rng.choice(["null", "~", ""])
    else:
        out = str(item).lower() if isinstance(item, bool) else str(item)
    if rng.random() < 0.05:
        out = rng.choice(["&a ", "!!str ", "!!binary ", "!custom "]) + out
    if rng.random() < 0.03:
        out = "*a"
    return out


def document(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randint(0, 8)):
        key = rng.choice(KEYS)
        if key in SECRET_KEYS:
            item = secret_value(rng)
        elif key == "headers":
            item = {text(rng) or "x-a": secret_value(rng) for _ in range(rng.randint(0, 3))}
        elif key in ("tracking_uri", "endpoint"):
            item = url(rng, secret=rng.random() < 0.5)
        elif key in SPECS and rng.random() < 0.5:
            item = plausible(rng, key)
        else:
            item = value(rng)
        lines.append(f"{key}: {render(item, rng)}")
    body = "\n".join(lines) + "\n"
    roll = rng.random()
    if roll < 0.1 and lines:
        body += rng.choice(lines) + "\n"  # a duplicate key
    elif roll < 0.2:
        spot = rng.randint(0, len(body))
        body = body[:spot] + rng.choice([*ODD, "\t", "  - ", ": ", "---\n", "\ufeff"]) + body[spot:]
    elif roll < 0.25:
        body = "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nservice_name: *b\n"
    encoded = body.encode("utf-8", "surrogatepass")
    if rng.random() < 0.03:
        encoded += bytes(rng.randrange(256) for _ in range(8))
    return encoded


def environment(rng: random.Random, config: Path, in_cwd: bool) -> dict[str, str]:
    env: dict[str, str] = {"S": SECRET, "PLAIN": text(rng)}
    if not in_cwd:
        env["TRACED_RUN_CONFIG"] = str(config)
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        var = rng.choice(ENV_VARS)
        if rng.random() < 0.6:
            env[var] = plausible(rng, SETTING_OF[var])
        elif var in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            env[var] = str(secret_value(rng)).replace("${S}", SECRET)
        elif var.endswith("_HEADERS"):
            env[var] = f"x-a={rng.choice([SECRET, SECRET + '%0D%0A', SECRET + '%zz'])},{text(rng)}"
        elif var in ("MLFLOW_TRACKING_URI", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env[var] = url(rng, secret=rng.random() < 0.5)
        else:
            env[var] = text(rng)
    if rng.random() < 0.2:
        option = rng.choice(OPTIONS)
        given = {option: rng.choice([text(rng), url(rng, secret=option == "tracking_uri"), True, 3, None])}
        env[OPTIONS_ENV] = json.dumps(given) if rng.random() < 0.9 else text(rng)
    # An environment holds no NUL, and Linux no variable over 128 KiB.
    return {k: v.replace("\x00", "")[:100_000] for k, v in env.items()}


def case(index: int, directory: Path) -> tuple[bytes, dict[str, str]]:
    rng = random.Random(SEED * 1_000_003 + index)
    in_cwd = rng.random() < 0.3
    config = directory / ("traced-run.yaml" if in_cwd else "fuzz.yaml")
    (directory / "traced-run.yaml").unlink(missing_ok=True)
    data = document(rng)
    config.write_bytes(data)
    return data, environment(rng, config, in_cwd)
