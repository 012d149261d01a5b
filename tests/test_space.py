"""Search spaces: the shipped YAML files load, every bad input names file + key + what is
allowed, and conditional parameters are sampled only when their condition holds (through a
real optuna study, as OptunaSearch drives it)."""
from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import pytest

from raysparse.config import METHODS, TrialConfig
from raysparse.errors import ConfigError
from raysparse.search.space import DefineByRun, ParamSpec, SearchSpace
from raysparse.search.space_file import load_space, parse_space

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))

LORA_SPACE = """
fixed:
  model: tiny
  sparsity: 0.5
params:
  method: {choice: [wanda, magnitude]}
  recovery: {choice: [none, masked, lora]}
  lora_r: {choice: [4, 8, 16], when: {recovery: lora}}
  lr: {loguniform: [1.0e-5, 1.0e-3], when: {recovery: [masked, lora]}}
  lora_alpha: {int: [8, 32], step: 8, when: {lora_r: [8, 16]}}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> SearchSpace:
    return load_space(write(tmp_path, text))


@pytest.fixture(scope="module")
def optuna_mod():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --- shipped spaces -------------------------------------------------------------------


def test_shipped_spaces_exist():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "imp_opt125m.yaml", "oneshot_lora.yaml"} <= names
    # The structured GQA space ships together with the structured pruning method.
    from raysparse.config import METHODS

    assert ("structured_gqa.yaml" in names) == ("structured" in METHODS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_loads_and_samples(path: Path):
    space = load_space(path)
    assert space.params and space.source == str(path)
    rng = random.Random(0)
    for _ in range(5):
        config = space.random_config(rng)
        assert isinstance(config, TrialConfig)
        for key, value in space.fixed.items():
            assert getattr(config, key) == (str(value) if key == "sparsity" else value)
    # the recorded form loads back to the same space
    assert parse_space(space.to_dict()).to_dict() == space.to_dict()


def test_default_space_is_the_cheap_cpu_setting():
    space = load_space(SPACES_DIR / "default.yaml")
    assert space.fixed["model"] == "tiny" and space.params["method"].choices == ("magnitude", "wanda")
    assert space.fixed["schedule"] == "iterative" and space.fixed["recovery"] == "masked"
    assert float(space.fixed["sparsity"]) == 0.8
    # The knobs the product names: prune percentage, epochs per iteration, alpha with a
    # per-layer strategy, and sample counts (calibration and importance samples).
    assert {"prune_percentage", "lr", "epochs_per_iteration", "pruning_strategy", "alpha", "nsamples",
            "importance_samples"} <= set(space.params)


# --- the format -----------------------------------------------------------------------


def test_every_kind_parses(tmp_path: Path):
    space = load_text(tmp_path, """
fixed: {schedule: iterative, recovery: masked, lr: 1e-4}
params:
  prune_percentage: {uniform: [0.1, 0.5]}
  weight_decay: {loguniform: [1.0e-4, 1.0e-1]}
  epochs_per_iteration: {int: [1, 5], step: 2}
  batch_size: {int: [2, 16], log: true}
  percdamp: {quniform: [0.01, 0.1, 0.01]}
  max_steps: {choice: [null, 8, 16]}
""")
    assert space.fixed["lr"] == 1e-4  # PyYAML reads 1e-4 as a string; float fields accept it
    p = space.params
    assert p["prune_percentage"] == ParamSpec.uniform(0.1, 0.5)
    assert p["weight_decay"] == ParamSpec.loguniform(1e-4, 0.1)
    assert p["epochs_per_iteration"] == ParamSpec.integer(1, 5, step=2)
    assert p["batch_size"] == ParamSpec.integer(2, 16, log=True)
    assert p["percdamp"] == ParamSpec.quniform(0.01, 0.1, 0.01)
    assert p["max_steps"] == ParamSpec.choice([None, 8, 16])
    rng = random.Random(1)
    for _ in range(50):
        drawn = space.random_params(rng)
        assert 0.1 <= drawn["prune_percentage"] <= 0.5
        assert 1e-4 <= drawn["weight_decay"] <= 0.1
        assert drawn["epochs_per_iteration"] in (1, 3, 5)
        assert 2 <= drawn["batch_size"] <= 16
        assert any(abs(drawn["percdamp"] - 0.01 * k) < 1e-9 for k in range(1, 11))
        assert drawn["max_steps"] in (None, 8, 16)
        space.sample_config(drawn)


# --- bad inputs -----------------------------------------------------------------------


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message, message  # every message names the file
    return message


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, expected", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("fixed: {model: tiny}\n", "no params"),
    ("fixed: {model: tiny}\nparams: {}\n", "no params"),
    ("params: [lr]\n", "'params' must map"),
    ("- a\n- b\n", "mapping"),
    ("params:\n  lr: {uniform: [0.1, 0.2]\n", "cannot parse"),
    ("params:\n  lr: {uniform: [0.1, 0.2]}\n  lr: {uniform: [0.1, 0.3]}\n", "duplicate key 'lr'"),
    ("settings: {}\nparams: {lr: {uniform: [0.1, 0.2]}}\n", "unknown top-level key.*settings"),
])
def test_structural_errors(tmp_path: Path, text: str, expected: str):
    assert re.search(expected, error_of(tmp_path, text))


def test_unknown_key_lists_allowed_fields(tmp_path: Path):
    message = error_of(tmp_path, "params:\n  learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n")
    assert "learning_rate" in message and "params" in message
    assert "prune_percentage" in message and "lora_r" in message  # the allowed names are listed
    message = error_of(tmp_path, "fixed: {modle: tiny}\nparams: {lr: {uniform: [0.1, 0.2]}}\n")
    assert "modle" in message and "fixed" in message and "model" in message


@pytest.mark.parametrize("spec, expected", [
    ("{uniform: [0.5, 0.1]}", "low must be < high"),
    ("{uniform: [0.1, 0.1]}", "low must be < high"),
    ("{loguniform: [0.0, 0.1]}", "loguniform needs low > 0"),
    ("{quniform: [0.1, 0.5, 0]}", "step 0 must be > 0"),
    ("{quniform: [0.1, 0.5, -0.1]}", "must be > 0"),
    ("{quniform: [0.1, 0.5, 0.15]}", "largest reachable value would be 0.4"),
    ("{uniform: [0.1]}", r"takes \[low, high\]"),
    ("{uniform: [a, 0.2]}", "low 'a' is not a number"),
    ("{normal: [0.1, 0.2]}", "exactly one of uniform, loguniform, int, quniform, choice"),
    ("{uniform: [0.1, 0.2], choice: [0.1]}", "exactly one of"),
    ("{uniform: [0.1, 0.2], step: 0.1}", "unknown key.*step.*allowed: uniform, when"),
    ("0.3", "constants go under 'fixed'"),
    ("{choice: []}", "non-empty list"),
    ("{choice: [0.1, 0.1]}", "more than once"),
])
def test_bad_ranges(tmp_path: Path, spec: str, expected: str):
    message = error_of(tmp_path, f"fixed: {{schedule: iterative}}\nparams:\n  prune_percentage: {spec}\n")
    assert "prune_percentage" in message and re.search(expected, message), message


@pytest.mark.parametrize("key, spec, expected", [
    ("lora_r", "{choice: [4, big]}", "'big' is a str but lora_r takes an int"),
    ("lora_r", "{uniform: [4.0, 16.0]}", "uniform draws floats but lora_r takes an int.*use int"),
    ("lora_r", "{int: [4.5, 16]}", "not an integer"),
    ("batch_size", "{int: [0, 8], step: 0}", "step 0 must be > 0"),
    ("batch_size", "{int: [1, 16], step: 2, log: true}", "log: true works only with step 1"),
    ("batch_size", "{int: [1, 8], step: 3}", "largest reachable value would be 7"),
    ("lr", "{int: [1, 3]}", "int draws integers but lr takes a float"),
    ("lr", "{choice: [fast]}", "'fast' is a str but lr takes a float"),
    ("method", "{choice: [wanda, obs]}", "method 'obs' is not allowed; choose one of " + ", ".join(METHODS)),
    ("method", "{uniform: [0, 1]}", "use choice"),
    ("recovery", "{choice: [masked, full]}", "choose one of none, masked, lora"),
    ("save", "{choice: [yes, 1]}", "1 is a int but save takes a bool"),
    ("lora_r", "{choice: [null, 8]}", "lora_r cannot be null"),
])
def test_wrong_type_for_field(tmp_path: Path, key: str, spec: str, expected: str):
    message = error_of(tmp_path, f"params:\n  {key}: {spec}\n")
    assert key in message and re.search(expected, message), message


def test_wrong_fixed_type(tmp_path: Path):
    message = error_of(tmp_path, "fixed: {nsamples: 12.5}\nparams: {lr: {uniform: [0.1, 0.2]}}\n")
    assert "fixed.nsamples" in message and "takes an int" in message
    message = error_of(tmp_path, "fixed: {lr: {uniform: [0.1, 0.2]}}\nparams: {nsamples: {int: [1, 4]}}\n")
    assert "fixed.lr" in message and "move distributions to params" in message


def test_key_in_fixed_and_params(tmp_path: Path):
    message = error_of(tmp_path, "fixed: {lr: 1.0e-4}\nparams: {lr: {loguniform: [1.0e-5, 1.0e-3]}}\n")
    assert "'lr' is in both fixed and params" in message


@pytest.mark.parametrize("params, expected", [
    ("  lora_r: {choice: [4, 8], when: {recovrey: lora}}\n", "unknown setting 'recovrey'.*allowed TrialConfig fields"),
    ("  lora_r: {choice: [4, 8], when: {recovery: lora}}\n  recovery: {choice: [none, lora]}\n",
     "'recovery' is defined later.*move 'recovery' above 'lora_r'"),
    ("  lora_r: {choice: [4, 8], when: {lora_alpha: 16}}\n  lora_alpha: {choice: [8, 16], when: {lora_r: 4}}\n",
     "depend on each other \\(circular"),
    ("  lora_r: {choice: [4, 8], when: {lora_r: 4}}\n", "cannot depend on itself"),
    ("  lora_r: {choice: [4, 8], when: {schedule: iterative}}\n", "'schedule' is neither fixed nor searched"),
    ("  recovery: {choice: [none, lora]}\n  lora_r: {choice: [4, 8], when: {recovery: masked}}\n",
     "recovery can never be 'masked'; its choices are"),
    ("  recovery: {choice: [none, lora]}\n  lora_r: {choice: [4, 8], when: {recovery: lroa}}\n",
     "recovery 'lroa' is not allowed"),
    ("  lr: {uniform: [0.001, 0.01]}\n  lora_r: {choice: [4, 8], when: {lr: 0.001}}\n", "continuous"),
    ("  lora_r: {choice: [4, 8], when: {model: other}}\n", "model is fixed to 'tiny'.*never"),
    ("  lora_r: {choice: [4, 8], when: recovery}\n", "expected a mapping"),
])
def test_bad_conditions(tmp_path: Path, params: str, expected: str):
    message = error_of(tmp_path, f"fixed: {{model: tiny}}\nparams:\n{params}")
    assert "when" in message and re.search(expected, message), message


def test_values_are_validated_against_trial_config(tmp_path: Path):
    # the high end of lr is outside TrialConfig's (0, 1)
    message = error_of(tmp_path, "fixed: {recovery: masked}\nparams: {lr: {uniform: [0.1, 1.0]}}\n")
    assert "params.lr value 1.0 fails validation" in message and "lr 1.0 must be in (0, 1)" in message
    # prune_percentage only matters for iterative schedules; the high end reaches 1.0
    message = error_of(tmp_path, "fixed: {schedule: iterative}\nparams: {prune_percentage: {uniform: [0.5, 1.0]}}\n")
    assert "params.prune_percentage value 1.0" in message and "outside (0, 1)" in message
    # a conditional param is checked where its condition holds (lora_r only matters for lora)
    message = error_of(tmp_path, "params:\n  recovery: {choice: [none, lora]}\n"
                                 "  lora_dropout: {choice: [0.0, 1.5], when: {recovery: lora}}\n")
    assert "params.lora_dropout value 1.5" in message and "recovery': 'lora'" in message
    # a combination with a fixed setting: N:M sparsity cannot be iterative
    message = error_of(tmp_path, "fixed: {sparsity: '2:4'}\nparams: {schedule: {choice: [oneshot, iterative]}}\n")
    assert "params.schedule value 'iterative'" in message and "N:M" in message
    # fixed settings broken on their own
    message = error_of(tmp_path, "fixed: {sparsity: 1.5}\nparams: {lr: {uniform: [0.1, 0.2]}}\n")
    assert "fixed settings" in message and "sparsity 1.5 is outside" in message


# --- sampling -------------------------------------------------------------------------


def test_define_by_run_honours_conditions(tmp_path: Path, optuna_mod):
    space = load_text(tmp_path, LORA_SPACE)
    define = space.optuna_define_by_run()
    study = optuna_mod.create_study(sampler=optuna_mod.samplers.RandomSampler(seed=0))
    seen_recoveries, seen_alpha = set(), 0
    for _ in range(30):
        trial = study.ask()
        returned = define(trial)
        assert returned == space.fixed  # constants, passed through by OptunaSearch
        params = trial.params
        seen_recoveries.add(params["recovery"])
        assert ("lora_r" in params) == (params["recovery"] == "lora")
        assert ("lr" in params) == (params["recovery"] in ("masked", "lora"))
        assert ("lora_alpha" in params) == (params.get("lora_r") in (8, 16))
        seen_alpha += "lora_alpha" in params
        if "lora_alpha" in params:
            assert params["lora_alpha"] in (8, 16, 24, 32)
        config = space.sample_config({**returned, **params})
        assert config.recovery == params["recovery"] and config.model == "tiny"
        study.tell(trial, 1.0)
    assert seen_recoveries == {"none", "masked", "lora"} and seen_alpha > 0


def test_define_by_run_order_is_deterministic(tmp_path: Path, optuna_mod):
    space = load_text(tmp_path, LORA_SPACE)
    study = optuna_mod.create_study(sampler=optuna_mod.samplers.RandomSampler(seed=0))
    names: list[str] = []

    class Recorder:  # stands in for Tune's captor: forwards suggest_* and records the order
        def __init__(self, trial):
            self.trial = trial

        def __getattr__(self, name):
            method = getattr(self.trial, name)
            return lambda key, *a, **k: (names.append(key), method(key, *a, **k))[1]

    trial = study.ask(fixed_distributions={})
    space.optuna_define_by_run()(Recorder(trial))
    assert names == [n for n in space.params if n in trial.params]
    assert names[:2] == ["method", "recovery"]
    # OptunaSearch pickles its space when Tune checkpoints the searcher
    assert isinstance(pickle.loads(pickle.dumps(space.optuna_define_by_run())), DefineByRun)


def test_sample_config_drops_inactive_and_validates(tmp_path: Path):
    space = load_text(tmp_path, LORA_SPACE)
    config = space.sample_config({"method": "wanda", "recovery": "none", "lora_r": 16, "lr": 0.5})
    assert isinstance(config, TrialConfig)
    assert config.lora_r == TrialConfig.lora_r and config.lr == TrialConfig.lr  # inactive: defaults
    config = space.sample_config({"method": "wanda", "recovery": "lora", "lora_r": 16, "lr": 3e-4,
                                  "lora_alpha": 24, "model": "tiny", "sparsity": 0.5})
    assert (config.lora_r, config.lora_alpha, config.lr, config.sparsity) == (16, 24, 3e-4, "0.5")
    with pytest.raises(ConfigError, match="no value for active parameter 'lora_r'"):
        space.sample_config({"method": "wanda", "recovery": "lora", "lr": 3e-4})
    with pytest.raises(ConfigError, match="lr 2.0 must be in"):
        space.sample_config({"method": "wanda", "recovery": "masked", "lr": 2.0})
    with pytest.raises(ConfigError, match="batch_size are not in this space"):
        space.sample_config({"method": "wanda", "recovery": "none", "batch_size": 4})
    with pytest.raises(ConfigError, match="contradicts the fixed value"):
        space.sample_config({"method": "wanda", "recovery": "none", "model": "other"})


def test_random_config_is_seeded_and_conditional(tmp_path: Path):
    space = load_text(tmp_path, LORA_SPACE)
    first = [space.random_config(random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng_a, rng_b = random.Random(3), random.Random(3)
    run_a = [space.random_params(rng_a) for _ in range(40)]
    run_b = [space.random_params(rng_b) for _ in range(40)]
    assert run_a == run_b
    assert run_a != [space.random_params(random.Random(4)) for _ in range(40)]
    for drawn in run_a:
        assert ("lora_r" in drawn) == (drawn["recovery"] == "lora")
        assert ("lora_alpha" in drawn) == (drawn.get("lora_r") in (8, 16))
    assert {d["recovery"] for d in run_a} == {"none", "masked", "lora"}


def test_python_constructors_match_yaml_round_trip():
    space = SearchSpace(
        fixed={"model": "tiny"},
        params={"recovery": ParamSpec.choice(["none", "lora"]),
                "lora_r": ParamSpec.choice([4, 8], when={"recovery": "lora"}),
                "lr": ParamSpec.loguniform(1e-5, 1e-3, when={"recovery": ["lora"]})},
        source="inline",
    )
    data = space.to_dict()
    assert data["params"]["lora_r"] == {"choice": [4, 8], "when": {"recovery": "lora"}}
    again = parse_space(data)
    assert again.params == space.params and again.source == "inline"
