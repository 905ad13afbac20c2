"""cluster/aws.yaml validates against Ray's own cluster schema, and keeps the promises in its comments."""

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster" / "aws.yaml"


def load():
    return yaml.safe_load(CLUSTER.read_text())


def test_validates_against_ray_schema():
    validate_config(prepare_config(copy.deepcopy(load())))


def test_workers_have_instance_profile_and_head_is_cpu_only():
    cfg = load()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["node_config"]["InstanceType"] and head["resources"].get("CPU") == 0
    for name, node in types.items():
        assert "IamInstanceProfile" in node["node_config"], f"{name} cannot write checkpoints to S3"


def test_spot_is_optional_and_elastic_range_matches_preset():
    from raytrainer.config import load_config

    types = load()["available_node_types"]
    assert types["gpu_p5_spot"]["min_workers"] == 0
    assert types["gpu_p5_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    p = load_config("llama-1b").parallel
    gpus_per_p5 = 8
    assert types["gpu_p5"]["min_workers"] * gpus_per_p5 == p.min_workers
    assert types["gpu_p5"]["max_workers"] * gpus_per_p5 == p.max_workers


def test_dashboard_not_exposed_and_auth_on():
    cfg = load()
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_cmds and "RAY_AUTH_MODE=token" in head_cmds
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert any("raytrainer" in c for c in cfg["setup_commands"])
