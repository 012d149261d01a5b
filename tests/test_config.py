import pytest

from raysparse.config import PruneConfig
from raysparse.errors import ConfigError
from raysparse.sparsity.pattern import parse_sparsity


@pytest.mark.parametrize("value,ratio,nm", [("0.5", 0.5, None), (0.0, 0.0, None), ("2:4", 0.5, (2, 4)),
                                            ("4:8", 0.5, (4, 8)), ("1:4", 0.25, (1, 4))])
def test_parse_sparsity_accepts(value, ratio, nm):
    pattern = parse_sparsity(value)
    assert pattern.ratio == pytest.approx(ratio)
    assert ((pattern.n, pattern.m) if pattern.is_nm else None) == nm


@pytest.mark.parametrize("value,fragment", [("1.0", "outside [0, 1)"), ("-0.1", "outside [0, 1)"),
                                            ("1.5", "outside"), ("4:2", "N < M"), ("4:4", "N < M"),
                                            ("half", "neither")])
def test_parse_sparsity_rejects_with_fix(value, fragment):
    with pytest.raises(ConfigError) as info:
        parse_sparsity(value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("changes,fragment", [
    ({"method": "obs"}, "unknown method"),
    ({"nsamples": 0}, "nsamples must be an integer >= 1"),
    ({"seqlen": 1}, "seqlen"),
    ({"eval_seqlen": 16, "eval_stride": 32}, "stride"),
    ({"magnitude_scope": "global", "sparsity": "2:4", "method": "magnitude"}, "global"),
    ({"save": True}, "--output"),
    ({"dtype": "int3"}, "dtype"),
])
def test_validate_names_the_problem(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        PruneConfig(**changes).validate()


def test_from_dict_rejects_unknown_keys_and_lists_known():
    with pytest.raises(ConfigError, match="unknown setting.*sparsty.*known settings are"):
        PruneConfig.from_dict({"sparsty": 0.5})


def test_from_file_reads_a_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"config": {"method": "sparsegpt", "sparsity": "2:4"}, "ppl_dense": 3.0}')
    config = PruneConfig.from_file(path)
    assert config.method == "sparsegpt" and config.pattern.n == 2
