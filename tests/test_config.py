"""Configuration: flags, environment variables, and the README table that documents them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from embedserve.service.cli import build_parser
from embedserve.service.config import (
    OPTIONS,
    ServerConfig,
    add_arguments,
    from_namespace,
    markdown_table,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ or {})
    return from_namespace(parser.parse_args(argv))


def test_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- generated from service/config.py")
    block = text[text.index("\n", start) + 1 : text.index("<!-- end generated -->")].strip()
    assert block == markdown_table()


def test_every_config_field_has_a_flag_and_an_env_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert {option.name for option in OPTIONS} == set(ServerConfig.__dataclass_fields__)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        assert option.flag in help_text
        assert option.env in help_text


def test_environment_sets_defaults_and_flags_win() -> None:
    env = {
        "EMBEDSERVE_PORT": "6000",
        "EMBEDSERVE_TRUNCATION": "error",
        "EMBEDSERVE_WARMUP": "false",
    }
    config = parse([], env)
    assert (config.port, config.truncation, config.warmup) == (6000, "error", False)
    assert parse(["--port", "7000"], env).port == 7000
    assert parse([]).port == ServerConfig().port


def test_model_paths_parse_as_paths() -> None:
    config = parse(["--model", "/models/qwen", "--reranker", "/models/rr"])
    assert config.model == Path("/models/qwen") and config.reranker == Path("/models/rr")


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("EMBEDSERVE_MAX_BATCH_SIZE", "abc"),
        ("EMBEDSERVE_MAX_BATCH_SIZE", "0"),
        ("EMBEDSERVE_TRUNCATION", "sideways"),
        ("EMBEDSERVE_WARMUP", "maybe"),
    ],
)
def test_bad_environment_values_are_refused(
    env: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse([], {env: value})
    assert env in capsys.readouterr().err


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--max-batch-tokens", "-5"])
    assert "--max-batch-tokens" in capsys.readouterr().err
