import pytest

from ift.config import (
    Config,
    ConfigError,
    DataConfig,
    PeftConfig,
    SourceConfig,
    TrainConfig,
    build_config,
    describe,
    field_docs,
    load_config,
)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(
        "data:\n  sources:\n    - {path: a.json, tags: [cot]}\n    - {path: b.tsv, weight: 0.5}\n"
        "train:\n  lr: 1.0e-4\n"
    )
    cfg = load_config(str(p), ["train.lr=3e-4", "peft.r=16", "data.sources.1.weight=2.5",
                               "data.placeholders.name=ift"])
    assert cfg.train.lr == 3e-4
    assert cfg.peft.r == 16
    assert cfg.data.sources[0].tags == ["cot"]
    assert cfg.data.sources[1].weight == 2.5
    assert cfg.data.placeholders == {"name": "ift"}


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.learning_rat=1"])
    assert "train.learning_rat" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key 'trian'; did you mean train"):
        load_config(None, ["trian.lr=1"])


def test_bad_values_name_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["peft.method=lorra"])
    msg = str(e.value)
    assert "peft.method='lorra'" in msg and "did you mean 'lora'" in msg and "qlora" in msg
    with pytest.raises(ConfigError, match="train.micro_batch_size='x': expected an integer"):
        load_config(None, ["train.micro_batch_size=x"])
    with pytest.raises(ConfigError, match="train.num_workers=0"):
        load_config(None, ["train.num_workers=0"])
    with pytest.raises(ConfigError, match="data.sources.0.format='alpacca'.*did you mean 'alpaca'"):
        load_config(None, ["data.sources.0.path=x", "data.sources.0.format=alpacca"])
    with pytest.raises(ConfigError, match="weight or count, not both"):
        load_config(None, ["data.sources.0.path=x", "data.sources.0.weight=1",
                           "data.sources.0.count=3"])
    # FSDP runs on CPU with gloo (a correctness path), so it is no longer refused there.
    assert load_config(None, ["train.strategy=fsdp"]).train.strategy == "fsdp"


def test_mixed_precision_no_is_a_word_not_false(tmp_path):
    """YAML 1.1 reads `no` as false; the choice gets its word back, on the command line
    and in a file."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    p = tmp_path / "mp.yaml"
    p.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(p)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision=True is not allowed"):
        load_config(None, ["train.mixed_precision=yes"])


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(p))


def test_every_field_has_a_docstring():
    for cls in (Config, DataConfig, SourceConfig, PeftConfig, TrainConfig):
        import dataclasses

        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docs: {missing}"
    rows = describe()
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
    assert any(k == "train.lr" for k, _, _ in rows)


def test_global_batch():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.num_workers=2", "train.grad_accum=3"])
    assert cfg.train.global_batch_size == 24


def test_resolve_relative_paths(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    assert cfg.resolve("runs/x") == str(tmp_path / "runs/x")
    assert cfg.resolve("/abs/x") == "/abs/x"
    assert cfg.resolve("s3://b/k") == "s3://b/k"
    cfg = load_config(None, ["storage.root=s3://bucket/prefix"])
    assert cfg.resolve("runs/x") == "s3://bucket/prefix/runs/x"


def test_retired_keys_of_old_run_configs_are_dropped():
    # config.yaml files written by earlier versions still load; the key has no effect.
    cfg = build_config({"train": {"shuffle_buffer": 0, "lr": 0.01}})
    assert cfg.train.lr == 0.01 and not hasattr(cfg.train, "shuffle_buffer")
    with pytest.raises(ConfigError, match="unknown key 'train.shuffle_buffers'"):
        build_config({"train": {"shuffle_buffers": 0}})


def test_yaml_values_name_environment_variables(tmp_path, monkeypatch):
    p = tmp_path / "env.yaml"
    p.write_text("storage:\n  root: s3://${IFT_BUCKET}/work\n")
    monkeypatch.setenv("IFT_BUCKET", "my-bucket")
    assert load_config(str(p)).storage.root == "s3://my-bucket/work"
    monkeypatch.delenv("IFT_BUCKET")
    with pytest.raises(ConfigError, match=r"env.yaml: storage.root=.*IFT_BUCKET.*not set"):
        load_config(str(p))


def test_real_ablation_config_is_on_the_bucket(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("IFT_BUCKET", "b")
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs"
                          / "cot-ablation-real.yaml"))
    assert cfg.storage.root == "s3://b/cot-ablation-real"
    assert all(s.path.startswith("s3://b/") for s in cfg.data.sources)
    assert cfg.eval.data.startswith("s3://b/")


def test_local_relative_paths_are_made_absolute_where_the_config_is_loaded(tmp_path,
                                                                          monkeypatch):
    """Ray Train workers start in a folder of their own session, so a config's relative
    paths must name the same files there as in the folder the command ran in."""
    import os

    (tmp_path / "ift-work" / "model").mkdir(parents=True)
    (tmp_path / "ift-work" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "types.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [
        "storage.root=ift-work", "model.name_or_path=ift-work/model",
        "model.adapter=ift-work/sft/final", "data.sources.0.path=data/*.jsonl",
        "data.sources.0.schema=types.json", "data.sources.1.path=@sample/alpaca_en.json",
        "eval.data=data/a.jsonl,val", "serve.adapter_root=ift-work",
        "tracking.uri=sqlite:///ift-work/mlflow.db", "train.data=prepared"])
    monkeypatch.chdir("/")  # where a worker would read them
    assert cfg.storage.root == str(tmp_path / "ift-work")
    assert os.path.isdir(cfg.model.name_or_path) and os.path.isdir(cfg.model.adapter)
    assert cfg.data.sources[0].path == str(tmp_path / "data" / "*.jsonl")
    assert cfg.data.sources[0].schema == str(tmp_path / "types.json")
    assert os.path.isfile(cfg.data.sources[1].path)  # bundled: the package's own file
    # a part that is not there stays as written: a name under storage.root
    assert cfg.eval.data == f"{tmp_path / 'data' / 'a.jsonl'},val"
    assert cfg.serve.adapter_root == str(tmp_path / "ift-work")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'ift-work' / 'mlflow.db'}"
    assert cfg.resolve(cfg.train.data) == str(tmp_path / "ift-work" / "prepared")
    # hub ids and remote paths are left alone
    cfg = load_config(None, ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct",
                             "storage.root=s3://bucket/work"])
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.storage.root == "s3://bucket/work"
