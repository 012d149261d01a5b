"""cluster.yaml and cluster-local.yaml pass Ray's own schema and defaults, offline."""
from pathlib import Path

import pytest
import yaml

from raysparse.cluster.config_check import validate_cluster_config
from raysparse.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_shipped_cluster_configs_validate(name):
    config = validate_cluster_config(ROOT / name)
    text = (ROOT / name).read_text()
    assert "--dashboard-host=127.0.0.1" in text  # the dashboard stays on localhost
    assert not any(word in text.lower() for word in ("aws_secret", "password", "private_key:"))  # no credentials
    assert config["cluster_name"].startswith("raysparse")


def test_a_misspelt_key_is_named_with_its_path(tmp_path):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_a10g_4x"]["max_worker"] = config["available_node_types"]["gpu_a10g_4x"].pop(
        "max_workers")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="available_node_types/gpu_a10g_4x.*max_worker"):
        validate_cluster_config(broken)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        validate_cluster_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        validate_cluster_config(bad)
