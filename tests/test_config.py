from pathlib import Path

import pytest

from nash.config import CompositeJudge, Config, ConfigError, QualityJudge, load_config
from nash.flows.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_is_complete_and_valid():
    import yaml

    cfg = load_config(ROOT / "configs" / "default.yaml")
    written = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    # Every key of every section is written out in the default file.
    for section, fields in Config.model_fields.items():
        model = CompositeJudge if section == "judge" else fields.annotation
        assert set(written[section]) == set(model.model_fields), section
    assert set(written["judge"]["components"][0]) == set(QualityJudge.model_fields)
    assert cfg.judge.kind == "composite" and [c.kind for c in cfg.judge.components] == ["quality", "rules"]


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\n  iteratons: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3: run.iteratons: unknown key" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sampling:\n  n: many\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: sampling.n: .*integer"):
        load_config(p)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sampler:\n  n: 3\n")
    with pytest.raises(ConfigError, match="sampler: unknown key"):
        load_config(p)


def test_set_overrides_are_typed_and_validated():
    cfg = load_config(None, ["sampling.n=6", "train.learning_rate=1e-5", "run.name=abc"])
    assert cfg.sampling.n == 6 and cfg.train.learning_rate == 1e-5 and cfg.run.name == "abc"
    with pytest.raises(ConfigError, match="--set: judge.kind: Input tag 'nope'"):
        load_config(None, ["judge.kind=nope"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["sampling.n"])


def test_base_file_is_merged(tmp_path):
    (tmp_path / "base.yaml").write_text("sampling:\n  n: 7\n  temperature: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nsampling:\n  n: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.sampling.n == 3 and cfg.sampling.temperature == 0.5


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /nope.yaml"):
        load_config("/nope.yaml")


def test_hash_ignores_iteration_count():
    a = load_config(None, ["run.iterations=1"])
    b = load_config(None, ["run.iterations=5"])
    c = load_config(None, ["train.beta=0.2"])
    assert a.hash() == b.hash() != c.hash()


def test_cli_reports_user_error_without_traceback(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("pairs:\n  min_margin: -1\n")
    assert main(["run", str(p), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nash: error:") and "pairs.min_margin" in err and "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_names_a_missing_prompts_file_or_policy_dir(tmp_path, capsys):
    cfg = ROOT / "configs" / "default.yaml"
    assert main(["run", str(cfg), "--runs-dir", str(tmp_path), "--set", "prompts.source=/no/such.jsonl"]) == 2
    assert "prompts.source: file not found: /no/such.jsonl" in capsys.readouterr().err
    assert main(["run", str(cfg), "--runs-dir", str(tmp_path), "--set", "policy.model=./no/such/dir"]) == 2
    assert "policy.model: directory not found: ./no/such/dir" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_cli_rejects_zero_iterations(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs" / "default.yaml"), "--iterations", "0", "--runs-dir", str(tmp_path)]) == 2
    assert "run.iterations: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_cli_refuses_a_run_longer_than_the_fresh_prompts(tmp_path, capsys):
    cfg = ROOT / "configs" / "default.yaml"
    assert main(["run", str(cfg), "--runs-dir", str(tmp_path), "--iterations", "6", "--set", "prompts.partition_size=64"]) == 2
    assert "prompts.partition_size: 336 training prompts give only 5 fresh partitions of 64" in capsys.readouterr().err


def test_each_judge_kind_has_its_own_keys():
    cfg = load_config(None, ["judge.kind=openai", "judge.base_url=http://127.0.0.1:9/v1", "judge.protocol=batched"])
    assert cfg.judge.kind == "openai" and cfg.judge.model == "gpt-4-turbo" and cfg.judge.protocol == "batched"
    with pytest.raises(ConfigError, match="--set: judge.base_url: unknown key"):
        load_config(None, ["judge.kind=rules", "judge.base_url=http://x"])
    with pytest.raises(ConfigError, match="judge.model: Field required"):
        load_config(None, ["judge.kind=hf"])
    with pytest.raises(ConfigError, match="weights has 1 entries for 2 components"):
        load_config(None, ["judge={kind: composite, components: [{kind: rules}, {kind: rules}], weights: [1]}"])


@pytest.mark.parametrize("name", ["self_rewarding", "dno_gpt4", "local_server"])
def test_recipes_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.run.name != "demo" and cfg.policy.model == load_config(ROOT / "configs" / "default.yaml").policy.model


def test_setting_another_judge_kind_drops_the_files_judge_keys():
    cfg = load_config(ROOT / "configs" / "default.yaml",
                      ["judge.base_url=http://127.0.0.1:9/v1", "judge.kind=openai", "judge.model=m"])
    assert cfg.judge.kind == "openai" and cfg.judge.base_url == "http://127.0.0.1:9/v1" and cfg.judge.model == "m"
    rec = load_config(ROOT / "configs" / "self_rewarding.yaml")
    assert rec.judge.kind == "self" and rec.judge.protocol == "pointwise"


def test_defaults_are_the_ones_default_yaml_writes_out():
    """One source of truth: a recipe without `base:` gets what configs/default.yaml documents."""
    from nash.config import Config

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    schema = dict(leaves(Config().model_dump(mode="json")))
    written = dict(leaves(load_config(ROOT / "configs" / "default.yaml").model_dump(mode="json")))
    assert len(schema) > 80  # the walk reached every section
    assert {k: (schema.get(k), written.get(k)) for k in schema.keys() | written.keys()
            if schema.get(k) != written.get(k)} == {}
    # default.yaml writes every key out: none of them comes from the schema alone.
    import yaml

    text = dict(leaves(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())))
    assert sorted(schema.keys() - text.keys()) == []
