from pathlib import Path

import pytest

from labelnext.pipelines.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_default_config_loads():
    cfg = load_config()
    assert cfg.input.id_column == "id"
    assert cfg.candidates.factor == 5


def test_set_overrides_by_dotted_path():
    cfg = load_config(overrides=["score.backend=transformers", "cluster.k=64", "input.passthrough_columns=[a, b]"])
    assert cfg.score.backend == "transformers"
    assert cfg.cluster.k == 64
    assert cfg.input.passthrough_columns == ["a", "b"]


@pytest.mark.parametrize(
    "override, key",
    [("cluster.kk=3", "cluster.kk"), ("nope.x=1", "nope"), ("cluster.k.x=1", "cluster.k")],
)
def test_unknown_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_wrong_type_and_impossible_value_name_the_key():
    with pytest.raises(ConfigError, match=r"cluster\.k"):
        load_config(overrides=["cluster.k=many"])
    with pytest.raises(ConfigError, match=r"candidates\.factor"):
        load_config(overrides=["candidates.factor=0.5"])
    with pytest.raises(ConfigError, match=r"storage"):
        load_config(overrides=["storage.sse=aws:kms"])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed:\n  modle: x\n")
    with pytest.raises(ConfigError, match=r"embed\.modle: unknown key"):
        load_config(bad)


def test_all_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_local_ray_starts_with_the_configured_dashboard_setting(monkeypatch):
    import ray

    from labelnext.pipelines import dataflow
    from labelnext.pipelines.config import load_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dataflow.init_ray(load_config(overrides=["ray.num_cpus=2", "ray.include_dashboard=false"]))
    dataflow.init_ray(load_config())
    dataflow.init_ray(load_config(overrides=["ray.address=127.0.0.1:6379", "ray.include_dashboard=false"]))
    assert calls[0]["include_dashboard"] is False and calls[0]["num_cpus"] == 2
    assert "include_dashboard" not in calls[1]  # Ray's own default
    assert calls[2]["address"] == "127.0.0.1:6379" and "include_dashboard" not in calls[2]  # a cluster has its own


# ``labelnext config``: the effective config as YAML, one key explained, errors in one line naming the key.


def test_config_command_prints_the_merged_config(tmp_path):
    import yaml

    from tests.cli_run import labelnext

    res = labelnext("config", "--config", "nightly", "--set", "cluster.k=64")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed == load_config("nightly", ["cluster.k=64"]).model_dump(mode="json")
    assert printed["cluster"]["k"] == 64 and printed["cluster"]["warm_start"] is True  # the override, then nightly
    saved = tmp_path / "effective.yaml"
    saved.write_text(res.stdout)
    assert load_config(saved) == load_config("nightly", ["cluster.k=64"])  # the output is a config of its own


@pytest.mark.parametrize(
    "args, named",
    [
        (("--set", "cluster.kk=3"), "cluster.kk"),
        (("--set", "cluster.k=-1"), "cluster.k"),
        (("--config", "nightly", "--set", "select.rule=best"), "select.rule"),
        (("--config", "nope"), "nope"),
        (("--explain", "cluster.nope"), "cluster.nope"),
    ],
)
def test_config_command_names_a_bad_key_or_value_in_one_line(args, named):
    from tests.cli_run import labelnext

    res = labelnext("config", *args)
    assert res.returncode != 0
    assert res.stdout == ""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], res.stderr


def test_config_explain_prints_description_type_and_default():
    from labelnext.pipelines.config import RunConfig
    from tests.cli_run import labelnext

    res = labelnext("config", "--explain", "cluster.k")
    assert res.returncode == 0, res.stderr
    info = RunConfig.model_fields["cluster"].annotation.model_fields["k"]
    assert res.stdout.splitlines() == [f"cluster.k: {info.description}", "  type: int > 0 or null",
                                       "  default: null"]
    section = labelnext("config", "--explain", "select.task_model").stdout
    assert "select.task_model.cv_folds (int >= 2, default 5): " in section
