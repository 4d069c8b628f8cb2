"""Config sections: shared option groups declared once and mixed in, one validation entry point per config.

Every stage config is a `latentforge.config.StageConfig`: it checks its values in `validate()` (never its
own `__post_init__`) and names the options a run needs in `missing_options()`, which `check_required()`
turns into one error. The command line keeps its flat flags; `--help` groups them by section.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import latentforge
from latentforge.config import ConfigError, StageConfig, build_parser, field_docs, option_sections, parse_config
from latentforge.generation.options import SamplingOptions, UpscalerOptions
from latentforge.tracking import TrackingOptions

REPO = Path(__file__).resolve().parents[1]

# Every job's config, the ones whose flags FLAGS freezes and the rest.
STAGE_CONFIGS = {"TrainConfig", "AutoencoderTrainConfig", "DemoConfig"}

# The flags of these stages before the configs were split into sections: they must stay the same.
FLAGS = {
    "GenerateConfig": (
        "--batch-size --concurrency --condition --device --dtype --grid-max --guidance --height --help "
        "--init-image --init-images --mlflow --model --negative-prompt --no-mlflow --no-progress --no-ray "
        "--noise-level --num-cpus-per-actor --num-gpus-per-actor --out --preset --print-config --progress "
        "--prompts --ray --run-name --sampler --seed --steps --strength --text-states --upscaler "
        "--upscaler-guidance --upscaler-steps --width -h"
    ),
    "EvaluateConfig": (
        "--batch-size --cache-dir --clip-model --clip-weights --device --dtype --eval-set --fid-weights "
        "--fid-weights-sha256 --guidance --help --log-to-source-run --mlflow --model --negative-prompt "
        "--no-log-to-source-run --no-mlflow --noise-level --num-samples --out --preset --print-config "
        "--run-name --sampler --seed --steps --text-states --upscaler --upscaler-guidance --upscaler-steps -h"
    ),
    "PrecomputeConfig": (
        "--allow-partial-shards --batch-size --compute-dtype --concurrency --condition --crop --dtype "
        "--fidelity-samples --fidelity-tolerance --help --input --keep-empty-captions --latent --max-shards "
        "--mlflow --no-allow-partial-shards --no-keep-empty-captions --no-mlflow --no-progress "
        "--no-store-pixels --no-verify-finished --num-cpus-per-actor --num-gpus-per-actor --output "
        "--patch-size --preset --print-config --progress --read-backoff-s --read-batch-size --read-retries "
        "--resize-filter --resolution --resolutions --run-name --seed --store-pixels --text-encoder "
        "--text-encoder-weights --text-layer --text-states --vae --vae-type --verify-finished -h"
    ),
    "IngestConfig": (
        "--allow-networks --allow-private-network --allowed-formats --backoff-max-s --backoff-s "
        "--caption-col --cpus-per-task --encode-format --encode-quality --hash-col --hash-type --help "
        "--honor-opt-out --image-size --input --input-format --max-aspect-ratio --max-bytes "
        "--max-concurrent-shards --max-image-pixels --max-per-host --max-redirects --max-retry-after-s "
        "--min-image-size --mlflow --no-allow-private-network --no-honor-opt-out --no-mlflow --no-progress "
        "--no-resize-only-if-bigger --no-reuse-connections --no-verify-finished --num-cpus "
        "--opt-out-directives --output --preset --print-config --progress --resize-mode "
        "--resize-only-if-bigger --retries --retry-reasons --reuse-connections --run-name "
        "--samples-per-shard --threads-per-shard --timeout-s --url-col --user-agent-token --verify-finished -h"
    ),
    "ExportConfig": (
        "--dtype --format --help --model --out --preset --print-config --register-as --sampler --title -h"
    ),
}
CONVERTED = set(FLAGS)


def _config_classes() -> dict[str, type]:
    """Every dataclass defined in a `latentforge.<package>.config` or `.options` module, by name."""
    found: dict[str, type] = {}
    for module in pkgutil.walk_packages(latentforge.__path__, "latentforge."):
        if module.name.rsplit(".", 1)[-1] in ("config", "options"):
            loaded = importlib.import_module(module.name)
            found.update({name: value for name, value in vars(loaded).items() if inspect.isclass(value)
                          and value.__module__ == loaded.__name__ and dataclasses.is_dataclass(value)})
    return found


CLASSES = _config_classes()


def _stage_configs() -> dict[str, type]:
    """The configs the jobs parse (`parse_config(XConfig, ...)` in jobs/*.py)."""
    names = {name for job in (REPO / "jobs").glob("*.py")
             for name in re.findall(r"parse_config\((\w+)", job.read_text())}
    return {name: CLASSES[name] for name in names}


def test_every_stage_config_is_a_stage_config_that_validates_in_validate_only() -> None:
    stages = _stage_configs()
    assert CONVERTED | STAGE_CONFIGS <= set(stages)
    for name, cls in stages.items():
        assert issubclass(cls, StageConfig), name
    sections = {cls for cls in CLASSES.values() if issubclass(cls, StageConfig)}
    own_post_init = {cls.__name__ for cls in sections if "__post_init__" in vars(cls)}
    assert not own_post_init, own_post_init
    for name in CONVERTED | STAGE_CONFIGS | {"SamplingOptions", "UpscalerOptions"}:
        assert "validate" in vars(CLASSES[name]) and "__post_init__" not in vars(CLASSES[name]), name


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_the_flat_flags_stay_the_same(name) -> None:
    parser = build_parser(CLASSES[name])
    assert sorted(s for action in parser._actions for s in action.option_strings) == FLAGS[name].split()


def test_help_groups_the_flags_by_section_the_stage_s_own_first(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(CLASSES["GenerateConfig"], ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    heads = [out.index(f"\n{title}:\n") for title in
             ("GenerateConfig", "SamplingOptions", "UpscalerOptions", "TrackingOptions")]
    assert heads == sorted(heads)
    entry = lambda flag: out.index(f"\n  {flag}")  # noqa: E731  (a help entry, not the usage line)
    assert heads[0] < entry("--prompts PROMPTS") < heads[1] < entry("--sampler") < entry("--batch-size") < heads[2]
    assert heads[2] < entry("--noise-level") < heads[3] < entry("--mlflow, --no-mlflow")
    assert "How images are sampled" in out  # the section's docstring describes its group


def test_a_shared_field_is_declared_once_and_both_stages_use_it() -> None:
    generate, evaluate = CLASSES["GenerateConfig"], CLASSES["EvaluateConfig"]
    for config in (generate, evaluate):
        sections = option_sections(config)
        assert list(sections) == [config, SamplingOptions, UpscalerOptions, TrackingOptions]
        assert [f.name for f in sections[SamplingOptions]] == [f.name for f in dataclasses.fields(SamplingOptions)]
        for section in (SamplingOptions, UpscalerOptions):  # one help text, the section's
            assert {f.name: field_docs(config)[f.name] for f in dataclasses.fields(section)} == field_docs(section)
    declared = lambda cls: set(inspect.get_annotations(cls))  # noqa: E731
    assert not declared(generate) & (declared(SamplingOptions) | declared(UpscalerOptions))
    # evaluate keeps its own batch default: it re-declares the default only, the section keeps the field
    assert declared(evaluate) & (declared(SamplingOptions) | declared(UpscalerOptions)) == {"batch_size"}
    assert (generate().batch_size, evaluate().batch_size) == (4, 8)


@pytest.mark.parametrize("stage", ["GenerateConfig", "EvaluateConfig"])
@pytest.mark.parametrize("argv, option", [
    (["--steps", "0"], "steps"),
    (["--batch-size", "0"], "batch_size"),
    (["--sampler", "heun"], "sampler"),
    (["--dtype", "fp8"], "dtype"),
    (["--text-states", "everything"], "text_states"),
    (["--noise-level", "-1"], "noise_level"),
    (["--upscaler-steps", "0"], "upscaler_steps"),
])
def test_a_bad_value_in_a_section_is_refused_with_the_option_named(stage, argv, option, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(CLASSES[stage], argv)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("stage, values, option", [
    ("PrecomputeConfig", {"batch_size": 0}, "batch_size"),
    ("IngestConfig", {"image_size": 0}, "image_size"),
    ("ExportConfig", {"format": "zip"}, "format"),
    ("GenerateConfig", {"strength": 1.5}, "strength"),
    ("EvaluateConfig", {"num_samples": 1}, "num_samples"),
])
def test_a_stage_s_own_bad_value_is_refused_by_its_validate(stage, values, option) -> None:
    with pytest.raises(ConfigError, match=option):
        CLASSES[stage](**values)
    config = CLASSES[stage]()
    with pytest.raises(ConfigError, match=option):  # validate() is the one entry point: a changed copy too
        dataclasses.replace(config, **values)


@pytest.mark.parametrize("stage, missing", [
    ("GenerateConfig", "--model, --prompts, --out"),
    ("EvaluateConfig", "--model (or --upscaler), --eval-set"),
    ("PrecomputeConfig", "--input (ingest output dir), --output (latent dir)"),
    ("IngestConfig", "--input (a file, directory, glob or URI of URL lists), --output (the shard directory)"),
    ("ExportConfig", "--model"),
])
def test_check_required_names_every_missing_option_in_one_error(stage, missing, capsys) -> None:
    with pytest.raises(SystemExit) as exc:  # --print-config works on a config that is not complete
        parse_config(CLASSES[stage], ["--print-config"])
    assert exc.value.code == 0 and capsys.readouterr().out
    config = CLASSES[stage]()
    with pytest.raises(ConfigError) as err:
        config.check_required()
    assert str(err.value) == f"missing required option(s): {missing}"


def test_sections_normalise_their_values_for_every_stage() -> None:
    for name in ("GenerateConfig", "EvaluateConfig"):
        config = CLASSES[name](sampler="DPM-Solver++", upscaler="a, b")
        assert (config.sampler, config.upscalers) == ("dpmsolver++", ["a", "b"])
