"""Each setting is declared once, on its field: the flags, --help, the simple checks and the
search-space types all follow from it, so none of them can drift from the dataclass."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import pytest

from raysparse.cli.prune import build_prune_parser, config_from_args
from raysparse.cli.search import build_search_parser
from raysparse.config import Bounds, TrialConfig, setting, settings_of
from raysparse.errors import ConfigError
from raysparse.search.settings import SearchSettings
from raysparse.search.space_file import parse_space


def help_entries(parser: argparse.ArgumentParser) -> list[str]:
    """--help as one string per option (an option's help may wrap onto several lines)."""
    entries: list[str] = []
    for line in parser.format_help().splitlines():
        if re.match(r"^  -", line):
            entries.append(line.strip())
        elif entries and line.startswith("    ") and line.strip():
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("build, cls", [(build_prune_parser, TrialConfig), (build_search_parser, SearchSettings)])
def test_help_shows_every_setting_and_each_default_once(build, cls, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build()
    entries = help_entries(parser)
    for entry in entries:
        assert len(re.findall(r"\(default\b", entry)) <= 1, entry  # ArgumentDefaultsHelpFormatter would add one
        assert "None)" not in entry, entry
    dests = {action.dest for action in parser._actions}
    for spec in settings_of(cls).values():
        if not spec.cli:
            continue
        assert spec.name in dests, f"{spec.name} has no flag"
        (entry,) = [e for e in entries if re.match(rf"^{re.escape(spec.flag)}(?![\w-])", e)]
        if spec.default is not None or spec.shown:
            assert "(default " in entry, entry


def test_flags_and_aliases_reach_the_config():
    parse = build_prune_parser().parse_args
    config = config_from_args(parse(["--target-sparsity", "2:4", "--epochs", "3", "--no-keep-best", "--no-resume",
                                     "--no-test-after-prune", "--save", "--output", "x", "--lr", "1e-4"]))
    assert (config.sparsity, config.epochs_per_iteration, config.keep_best, config.resume) == ("2:4", 3, False, False)
    assert (config.test_after_prune, config.save, config.lr) == (False, True, 1e-4)
    assert config_from_args(parse(["--test-after-prune"])).test_after_prune is True
    assert config_from_args(parse([])) == TrialConfig()


def test_a_flag_not_given_keeps_the_config_files_value(tmp_path):
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps({"method": "sparsegpt", "nsamples": 7, "keep_best": False, "lr": 1e-3}))
    config = config_from_args(build_prune_parser().parse_args(["--config", str(path), "--nsamples", "9"]))
    assert (config.method, config.nsamples, config.keep_best, config.lr) == ("sparsegpt", 9, False, 1e-3)
    config = config_from_args(build_prune_parser().parse_args(["--config", str(path), "--keep-best"]))
    assert config.keep_best is True


def test_search_flags_fall_back_to_the_dataclass_defaults():
    args = build_search_parser().parse_args(["--num-samples", "3", "--no-early-stopping", "--plan"])
    values = {k: v for k, v in vars(args).items() if k not in ("resume", "plan")}
    assert values == {"num_samples": 3, "early_stopping": False}
    assert args.plan and args.resume is None


@pytest.mark.parametrize("cls", [TrialConfig, SearchSettings])
def test_every_bound_is_enforced_with_a_one_line_message(cls):
    cls().validate()  # the defaults keep their own declarations
    for spec in settings_of(cls).values():
        if spec.within is None:
            continue
        low = spec.within.low
        outside = low - 1 if spec.within.low_closed else low
        value = int(outside) if spec.base is int else float(outside)
        with pytest.raises(ConfigError) as info:
            dataclasses.replace(cls(), **{spec.name: value}).validate()
        message = str(info.value)
        assert spec.name in message and "\n" not in message, message


@pytest.mark.parametrize("changes, fragment", [
    ({"nsamples": "4"}, "nsamples must be an integer >= 1, got '4'"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"lr": "fast"}, "lr takes a float, got 'fast'"),
    ({"save": "yes"}, "save takes a bool, got 'yes'"),
    ({"model": None}, "model cannot be null"),
    ({"importance_method": "gradient"}, "unknown importance_method 'gradient': choose one of removal, activation"),
    ({"bf16": "maybe"}, "unknown bf16 'maybe'"),
    ({"weight_decay": -0.1}, "weight_decay -0.1 must be >= 0"),
    ({"percdamp": 1.0}, "percdamp 1.0 is outside [0, 1): the usual value is 0.01"),
    ({"lora_target_modules": ["q_proj", 3]}, "lora_target_modules takes a string"),
])
def test_declared_checks_name_the_setting(changes, fragment):
    with pytest.raises(ConfigError) as info:
        TrialConfig(**changes).validate()
    assert fragment in str(info.value)


def test_other_declared_types_are_accepted():
    TrialConfig(bf16=True, lora_target_modules=["q_proj"], sparsity=0.5, percdamp=0, recovery="lora").validate()


def test_a_plain_field_is_refused():
    @dataclasses.dataclass
    class Half:
        declared: int = setting(1, "a declared setting")
        plain: int = 2

    with pytest.raises(TypeError, match="Half.plain is a plain field"):
        settings_of(Half)
    with pytest.raises(TypeError, match="help line"):
        setting(1)


@pytest.mark.parametrize("text, inside, outside", [
    (">= 1", [1, 5], [0, 0.99, math.inf]), ("> 0", [1e-9], [0, -1]),
    ("[0, 1)", [0, 0.5], [1, -0.1]), ("(0, 1)", [0.5], [0, 1]), ("(0, 1]", [1], [0]),
])
def test_bounds_read_as_written(text, inside, outside):
    bounds = Bounds.parse(text)
    assert all(v in bounds for v in inside) and not any(v in bounds for v in outside)
    with pytest.raises(ValueError):
        Bounds.parse("between 0 and 1")


def test_space_files_take_choices_and_types_from_the_declarations():
    for params, fragment in [({"importance_method": {"choice": ["removal", "gradient"]}}, "choose one of removal"),
                             ({"bf16": {"choice": ["auto", "maybe"]}}, "bf16 'maybe' is not allowed")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_space({"params": params}, source="s.yaml")
    space = parse_space({"params": {"bf16": {"choice": [True, False, "auto"]}, "sparsity": {"uniform": [0.3, 0.6]}}})
    assert space.params["bf16"].choices == (True, False, "auto")  # bf16 is declared also=(bool,)
