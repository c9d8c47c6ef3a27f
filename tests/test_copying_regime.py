"""benchmarks/copying_regime.py: each arm's overrides load as a valid config; a full fine-tune arm trains the whole
UNet at its own rate in its own run dir and never lands on the LoRA run of the same arm."""

import sys

import pytest
from conftest import ROOT

from guard_train.lab.config import load_config

sys.path.insert(0, str(ROOT / "benchmarks"))
import copying_regime as cr  # noqa: E402


def _args(tmp_path, *extra: str):
    return cr.parse_args(["--out", str(tmp_path), *extra])


@pytest.mark.parametrize("arm", ["plain", "entropy+dup (default)"])
def test_full_mode_is_its_own_run(tmp_path, arm):
    lora = load_config(cr.overrides(arm, _args(tmp_path)))
    full = load_config(cr.overrides(arm, _args(tmp_path, "--mode", "full")))
    assert (lora.train.mode, full.train.mode) == ("lora", "full")
    assert (lora.train.learning_rate, full.train.learning_rate) == (1e-3, 1e-4)
    assert lora.train.lora_rank == 32
    assert full.run.name == lora.run.name + "__full" and full.run.output_dir == lora.run.output_dir
    # everything else (lab, seed, steps, evaluation, the arm's mitigations) is the same experiment
    assert full.data == lora.data and full.mitigation == lora.mitigation and full.eval == lora.eval
    assert full.train.seed == lora.train.seed and full.train.max_steps == lora.train.max_steps


def test_explicit_lr_wins(tmp_path):
    assert load_config(cr.overrides("plain", _args(tmp_path, "--mode", "full", "--lr", "3e-5"))).train.learning_rate \
        == 3e-5


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _args(tmp_path / "o", "--lr", "0")
    assert e.value.code == 2 and "--lr must be > 0" in capsys.readouterr().err
    assert cr.main(["--out", str(tmp_path / "o"), "--arms", "plain,nonsense"]) == 2
    assert "unknown arm(s) ['nonsense']" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_gather_reads_the_mode_s_run(tmp_path):
    (tmp_path / "runs" / "plain__full" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "plain").mkdir(parents=True)
    assert cr.gather(tmp_path, ["plain"], "full")["plain"]["finished"] is True
    assert cr.gather(tmp_path, ["plain"])["plain"]["finished"] is False


def test_train_wall_adds_the_segments_of_a_resumed_run():
    # first run logged to 450.6 s at its checkpoint (step 1000); the resumed run's clock restarted at 0
    lines = [{"step": 990, "wall_s": 446.5}, {"step": 1000, "wall_s": 450.6}, {"step": 1010, "wall_s": 5.2},
             {"step": 4000, "wall_s": 1335.1}, {"step": 4000, "loss": 0.1}]
    assert cr.train_wall(lines) == pytest.approx(450.6 + 1335.1)
    assert cr.train_wall(lines[:2]) == pytest.approx(450.6) and cr.train_wall([]) == 0.0
