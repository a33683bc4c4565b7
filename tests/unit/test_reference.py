"""The example config and the settings reference are generated from the
settings table; these tests fail when either drifts from it."""

from __future__ import annotations

import re
from pathlib import Path

from traced_run.config import reference
from traced_run.config.settings import SPECS, Settings
from traced_run.config.sources import load

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_is_the_generated_one() -> None:
    assert (ROOT / "config" / "traced-run.yaml").read_text() == reference.example_config()


def test_settings_reference_is_the_generated_one() -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == reference.markdown_reference()


def test_example_config_names_every_yaml_setting_with_its_env_vars() -> None:
    text = reference.example_config()
    for name, spec in SPECS.items():
        if spec.in_yaml:
            assert f"\n# {name}: " in text
            for var in spec.env:
                assert var in text


def test_example_config_uncommented_gives_the_defaults(tmp_path: Path) -> None:
    keys = "|".join(SPECS)
    uncommented = re.sub(rf"(?m)^# (({keys}): )", r"\1", reference.example_config())
    path = tmp_path / "all.yaml"
    path.write_text(uncommented)
    loaded = load({"TRACED_RUN_CONFIG": str(path)})
    assert loaded.settings == Settings(config=str(path))
    from_file = {name for name, source in loaded.sources.items() if source.startswith(f"{path}:")}
    assert from_file == {"enabled", "strict", "headers", "timeout", "compression", "resource_attributes",
                         "insecure_tls", "exit_timeout", "queue_size", "spool_max_mb",
                         "spool_max_age", "include_content",
                         "include_binary_content", "redact", "redact_defaults", "redaction_marker",
                         "max_binary_bytes", "tags", "sample_ratio", "propagate_context", "mode",
                         "agent_version"}
