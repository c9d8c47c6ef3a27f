import subprocess

import pytest
from conftest import PY, ROOT

from guard_train.config.loader import ConfigError, all_keys
from guard_train.lab.config import LabRunConfig, load_config


def test_defaults_and_overrides():
    cfg = load_config(["recipe=tiny", "train.learning_rate=3e-4", "resume=latest", "data.lab.dup_repeats=8"])
    assert cfg.recipe == "tiny"
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.run.resume == "latest"  # alias
    assert cfg.data.lab.dup_repeats == 8
    assert cfg.train.mode == "full"  # from recipes/tiny.yaml, not the schema default


@pytest.mark.parametrize(
    "args, needle",
    [
        (["recipe=nope"], "unknown recipe 'nope'. Available recipes: "),
        (["train.lerning_rate=1e-4"], "Did you mean 'train.learning_rate'?"),
        (["train.batch_size=abc"], "wrong type for 'train.batch_size'"),
        (["train.learning_rate=-1"], "train.learning_rate must be > 0"),
        (["data.caption_dropout=1.5"], "data.caption_dropout must be in [0, 1)"),
        (["train.mode=qlora"], "train.mode must be one of lora, full, got 'qlora'"),
        (["data.lab.dup_fraction=2"], "lab.dup_fraction must be in [0, 1]"),
        (["mitigation.entropy_filter.quantile=1.5"], "mitigation.entropy_filter.quantile must be in (0, 1)"),
        (["mitigation.magnitude_filter.mode=fixed", "mitigation.magnitude_filter.threshold=-3"],
         "mitigation.magnitude_filter.threshold must be >= 0"),
        (["summary.copy_threshold=1.5"], "summary.copy_threshold must be in (0, 1)"),
        (["eval.copy_threshold=-0.1"], "eval.copy_threshold must be in (0, 1)"),
        (["eval.copy_rate_limit=2"], "eval.copy_rate_limit must be in [0, 1]"),
        (["mitigation.dup_sampling.threshold=-1"], "mitigation.dup_sampling.threshold must be >= 0"),
        (["train.v_weight_cap=0.5"], "train.v_weight_cap must be 0 (off) or >= 1"),
        (["train.v_weight_cap=100", "train.snr_gamma=5"], "set train.v_weight_cap or train.snr_gamma, not both"),
        (["train.timestep_bias_strategy=late"],
         "train.timestep_bias_strategy must be one of none, later, earlier, range"),
        (["train.timestep_bias_multiplier=0"], "train.timestep_bias_multiplier must be > 0"),
        (["train.timestep_bias_portion=1.5"], "train.timestep_bias_portion must be in (0, 1]"),
        (["train.timestep_bias_begin=900", "train.timestep_bias_end=100"],
         "must be >= 0 and < train.timestep_bias_end"),
        (["train.mode=full", "train.init_lora=models/tiny-sd-memorized-lora"], "train.init_lora needs train.mode=lora"),
        (["train.mode=lora", "train.init_lora=/no/lora"], "train.init_lora: /no/lora does not exist"),
        (["model.path=/no/such/dir"], "model.path '/no/such/dir' does not exist"),
        (["model.path=someone/not-cached-model"], "not in the local Hugging Face cache"),
        (["data.source=parquet"], "data.path is required for data.source=parquet"),
        (["data.source=parquet", "data.path=/no/laion/*.parquet"], "does not exist"),
        (["recipe=laion10k"], "data.path is required"),
        (["train.lr_scheduler=warp"], "train.lr_scheduler 'warp' is not one of"),
        (["bogus"], "arguments are key=value"),
        (["recipe=tiny", "data.source=imagefolder", "data.path=."], "turn it off with eval.every_n_steps=0"),
    ],
)
def test_bad_config_messages(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert needle in str(e.value)


def test_all_keys_cover_nested_lab():
    keys = all_keys(LabRunConfig)
    assert "data.lab.dup_repeats" in keys and "train.learning_rate" in keys and "run.resume" in keys
    core = all_keys()  # the core schema knows no lab key: a user's own data needs none
    assert "train.learning_rate" in core and not any(k.startswith(("data.lab.", "summary.")) for k in core)


def test_core_schema_refuses_lab_keys_with_a_pointer(tmp_path):
    from guard_train.config.loader import load_config as core_load

    with pytest.raises(ConfigError, match="lab's schema"):
        core_load(["recipe=tiny", f"run.output_dir={tmp_path}"])
    cfg = core_load(["recipe=lora_sd15", f"data.path={tmp_path}", "model.path=models/tiny-sd",
                     f"run.output_dir={tmp_path}"])
    assert type(cfg).__name__ == "Config" and cfg.data.source == "imagefolder" and not cfg.data.generated()


def test_cli_exit_code_2_and_nothing_written(tmp_path):
    out = tmp_path / "runs"
    r = subprocess.run([PY, "train.py", "recipe=tiny", "train.lerning_rate=1e-4", f"run.output_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'train.lerning_rate'" in r.stderr and "train.learning_rate" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_refuses_to_reuse_a_run_dir(tmp_path):
    from guard_train.training.loop import _decide_run_dir

    cfg = load_config(["recipe=tiny", f"run.output_dir={tmp_path}", "run.name=x"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.yaml").write_text("old run")
    (tmp_path / "x" / ".guard_train_run").write_text("")  # a run of ours (else it is refused as a user's folder)
    with pytest.raises(ConfigError, match="already holds a run"):
        _decide_run_dir(cfg)
    assert (tmp_path / "x" / "config.yaml").read_text() == "old run"  # nothing lost


def test_accelerate_configs_parse():
    import yaml

    for p in (ROOT / "accelerate_configs").glob("*.yaml"):
        d = yaml.safe_load(p.read_text())
        assert d["distributed_type"] in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED"), p
        assert isinstance(d["num_processes"], int)
    two = yaml.safe_load((ROOT / "accelerate_configs" / "cpu_2proc.yaml").read_text())
    assert two["distributed_type"] == "MULTI_GPU" and two["num_processes"] == 2  # not MULTI_CPU / --cpu (1 process)
