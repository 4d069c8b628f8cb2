"""The config system: defaults < preset < flags, docstrings as help, validation, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from latentforge.config import ConfigError, config_to_dict, field_docs, from_dict, parse_config


@dataclass
class DemoConfig:
    """A stage config used only by these tests."""

    input: str = ""
    """Where the rows come from."""
    samples_per_shard: int = 100
    """Rows per output shard."""
    quality: float = 0.9
    """Encoder quality in (0, 1]."""
    allow_private_network: bool = False
    """Let downloads reach private addresses."""
    mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"
    """How images are resized."""
    retry_reasons: list[str] = field(default_factory=list)
    """Reasons to retry."""
    limit: Optional[int] = None
    """Stop after this many rows."""

    def __post_init__(self) -> None:
        if self.samples_per_shard <= 0:
            raise ConfigError("samples_per_shard must be positive")


def test_field_docs_are_read_from_the_source() -> None:
    docs = field_docs(DemoConfig)
    assert docs["samples_per_shard"] == "Rows per output shard."
    assert set(docs) == {"input", "samples_per_shard", "quality", "allow_private_network", "mode",
                         "retry_reasons", "limit"}


def test_field_docs_survive_the_cross_thread_ast_race_and_are_parsed_once(monkeypatch) -> None:
    """CPython 3.11's AST builder can fail spuriously while another thread parses (gh-106905)."""
    import ast

    @dataclass
    class RacedConfig:
        steps: int = 1
        """Optimizer steps."""

    real_parse, calls = ast.parse, []

    def parse_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=141, after=71)")
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", parse_failing_once)
    assert field_docs(RacedConfig)["steps"] == "Optimizer steps."
    parsed = len(calls)
    assert field_docs(RacedConfig)["steps"] == "Optimizer steps." and len(calls) == parsed


def test_preset_then_flags_override(tmp_path) -> None:
    (tmp_path / "small.yaml").write_text("samples_per_shard: 10\nquality: 0.5\nmode: center_crop\n")
    config = parse_config(DemoConfig, ["--preset", "small", "--quality", "0.7", "--allow-private-network",
                                       "--retry-reasons", "timeout,http_5xx", "--limit", "5"], preset_dir=tmp_path)
    assert config == DemoConfig(samples_per_shard=10, quality=0.7, allow_private_network=True,
                                mode="center_crop", retry_reasons=["timeout", "http_5xx"], limit=5)
    assert config_to_dict(config)["retry_reasons"] == ["timeout", "http_5xx"]


def test_list_options_repeat_or_take_a_comma_list(tmp_path) -> None:
    config = parse_config(DemoConfig, ["--retry-reasons", "timeout", "--retry-reasons", "http_5xx,dns"])
    assert config.retry_reasons == ["timeout", "http_5xx", "dns"]
    (tmp_path / "p.yaml").write_text("retry_reasons: [timeout]\n")
    assert parse_config(DemoConfig, ["--preset", str(tmp_path / "p.yaml"), "--retry-reasons", "dns"]).retry_reasons == ["dns"]
    # a cascade's stages: `--upscaler SR --upscaler SR2` (docs/super_resolution.md) or one comma list
    from latentforge.generation.config import GenerateConfig

    repeated = parse_config(GenerateConfig, ["--model", "m", "--upscaler", "sr1", "--upscaler", "sr2"])
    assert repeated.upscalers == parse_config(GenerateConfig, ["--upscaler", "sr1,sr2"]).upscalers == ["sr1", "sr2"]
    assert GenerateConfig(upscaler="a, b").upscalers == ["a", "b"]  # built in code from one string


def test_help_shows_field_docstrings(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(DemoConfig, ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--samples-per-shard" in out and "Rows per output shard." in out


@pytest.mark.parametrize("argv, message", [
    (["--samples-per-shard", "0"], "must be positive"),
    (["--samples-per-shard", "ten"], "cannot read 'ten' as int"),
    (["--mode", "stretch"], "not one of"),
])
def test_invalid_values_exit_2_with_a_clear_message(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(DemoConfig, argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_keys_and_names_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(DemoConfig, {"sampels_per_shard": 3})
    (tmp_path / "a.yaml").write_text("quality: 1\n")
    with pytest.raises(ConfigError, match=r"unknown preset 'b'.*\['a'\]"):
        parse_config(DemoConfig, ["--preset", "b"], preset_dir=tmp_path)


def test_print_config_prints_resolved_yaml(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(DemoConfig, ["--input", "s3://bucket/rows.parquet", "--print-config"])
    assert exc.value.code == 0
    assert "input: s3://bucket/rows.parquet" in capsys.readouterr().out
