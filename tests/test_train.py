import json

import numpy as np
import pytest
import torch
from conftest import read_metrics, small_lab_args

from guard_train.data.loaders import DataError
from guard_train.lab.config import load_config
from guard_train.training.loop import train


def test_short_run_loss_decreases(tmp_path, tiny_sd_dir):
    res = train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "r", "train.max_steps": 40, "train.learning_rate": 1e-3, "train.lr_warmup_steps": 0})))
    losses = [m["loss"] for m in read_metrics(res["run_dir"])]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    run = tmp_path / "r"
    assert ((run / "config.yaml").exists() and (run / "final" / "unet").is_dir()
            and (run / "data" / "manifest.jsonl").exists())
    assert json.loads((run / "bad_items.json").read_text()) == []


@pytest.mark.parametrize("cut", [5, 7])
def test_resume_continues_the_same_loss_sequence_and_weights(tmp_path, tiny_sd_dir, cut):
    common = {"train.max_steps": 12, "train.checkpoint_every": 5, "train.learning_rate": 5e-4}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "straight"})))
    # the epoch has 7 batches: cut at 5 resumes mid-epoch then crosses an epoch; cut at 7 resumes after the epoch's
    # last batch, so the resumed process reads nothing before its first epoch end (regression: it used to stop there
    # with "no image in the dataset could be decoded")
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{**common, "train.max_steps": cut, "run.name": "cut"})))
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "cut", "resume": "latest"})))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(1, 13))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight/final/unet/diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "cut/final/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-10", "checkpoint-12"]  # total_limit 2, all complete


def test_a_run_over_partly_broken_data_finishes_and_counts_lists_the_bad_items(tmp_path, tiny_sd_dir):
    """Issue 7.4 end to end: broken files in a user's imagefolder are skipped, the run ends normally, every bad item
    is listed with its reason in the run dir and its count is in the logged metrics."""
    from PIL import Image

    from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder

    root = write_imagefolder(build_lab(LabConfig(num_instances=16, held_out=0, dup_fraction=0.25, dup_repeats=4)),
                             tmp_path / "data")
    train_dir = root / "train"
    (train_dir / "00001.png").write_bytes(b"")  # zero-byte
    (train_dir / "00002.png").write_bytes((train_dir / "00003.png").read_bytes()[:200])  # truncated
    (train_dir / "00004.png").write_text("not an image")
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(train_dir / "00005.jpg")
    meta = [json.loads(l) for l in (train_dir / "metadata.jsonl").read_text().splitlines()]
    meta[5]["file_name"] = "00005.jpg"  # CMYK decodes (converted), so it is not a bad item
    (train_dir / "00006.png").unlink()  # missing file
    with open(train_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in meta)
    res = train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "partly", "train.max_steps": 12, "data.source": "imagefolder", "data.path": str(root),
        "data.caption_column": "text"})))
    run = tmp_path / "partly"
    bad = json.loads((run / "bad_items.json").read_text())
    assert sorted(b["id"] for b in bad) == [1, 2, 4, 6] and all(b["error"] for b in bad)
    logged = read_metrics(run)
    assert [m["step"] for m in logged] == list(range(1, 13))  # the run went on to the end
    assert logged[-1]["bad_items"] == 4 and res["bad_items"] == 4


def test_a_dataset_with_no_decodable_image_stops_with_a_clear_error(tmp_path, tiny_sd_dir):
    root = tmp_path / "broken" / "train"
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(8):
            (root / f"{i:05d}.png").write_bytes(b"not a png" * i)  # zero-byte and garbage files
            meta.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"caption {i}"}) + "\n")
    cfg = load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "bad", "train.max_steps": 4, "data.source": "imagefolder", "data.path": str(tmp_path / "broken"),
        "data.caption_column": "text"}))
    with pytest.raises(DataError, match="no image in the dataset could be decoded"):
        train(cfg)


@pytest.mark.parametrize("targets", ["attention", "wide"])
def test_lora_save_and_load_lora_weights_gives_same_images(tmp_path, tiny_sd_dir, targets):
    """The exported LoRA reproduces the trained model through diffusers' own `pipe.load_lora_weights` and through
    our `load_lora`. "wide" (conv + ff + proj too) is the regression: the export used to mix diffusers' lora.down
    keys (attention) with PEFT's lora_A keys (the rest), and load_lora_weights then dropped every attention layer."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    from guard_train.metrics.memorization import generate
    from guard_train.models.loading import load_lora, load_pipeline
    from guard_train.training.loop import Trainer

    extra = {"train.lora_targets": "[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2]"} \
        if targets == "wide" else {}
    cfg = load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "lora", "train.mode": "lora", "train.lora_rank": 4, "train.max_steps": 6,
        "train.learning_rate": 5e-3, **extra}))
    trainer = Trainer(cfg)
    trainer.train()
    caps = ["a red circle on a cat photo"]
    mem = generate(trainer.pipeline(), caps, n=2, steps=4, guidance=5.0, seed=0)
    trainer.close()
    final = tmp_path / "lora" / "final"
    assert (final / "pytorch_lora_weights.safetensors").exists()

    def images(load) -> np.ndarray:
        pipe = load_pipeline(str(tiny_sd_dir))
        pipe.set_progress_bar_config(disable=True)
        load(pipe)
        return generate(pipe, caps, n=2, steps=4, guidance=5.0, seed=0)

    base = images(lambda p: None)
    assert np.abs(base.astype(int) - mem.astype(int)).max() > 1  # the LoRA changed the model
    for load in (lambda p: p.load_lora_weights(str(final)), lambda p: load_lora(p, str(final))):
        assert np.abs(images(load).astype(int) - mem.astype(int)).max() <= 1
    if targets == "wide":  # a file in the old mixed format (written before the fix) still loads whole via load_lora
        sd = load_file(final / "pytorch_lora_weights.safetensors")
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        save_file(convert_state_dict_to_diffusers(sd), mixed / "pytorch_lora_weights.safetensors")
        assert any(".lora.down." in k for k in load_file(mixed / "pytorch_lora_weights.safetensors"))
        assert np.abs(images(lambda p: load_lora(p, str(mixed))).astype(int) - mem.astype(int)).max() <= 1


def test_streaming_run_and_training_options(tmp_path, tiny_sd_dir):
    """Streaming parquet + LoRA + grad accumulation + EMA + min-SNR + noise offset + AdamW8bit + checkpointing +
    bf16."""
    from guard_train.lab.dataset import LabConfig, build_lab, write_parquet

    p = write_parquet(build_lab(LabConfig(num_instances=16, held_out=0)), tmp_path / "pq" / "train.parquet")
    res = train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "opts", "data.source": "parquet", "data.path": str(p), "data.streaming": "true",
        "data.id_column": "id", "train.mode": "lora", "train.max_steps": 6, "train.gradient_accumulation_steps": 2,
        "train.ema": "true", "train.snr_gamma": 5.0, "train.noise_offset": 0.05, "train.optimizer": "adamw8bit",
        "train.gradient_checkpointing": "true", "train.mixed_precision": "bf16", "train.learning_rate": 1e-3})))
    m = read_metrics(res["run_dir"])
    assert [x["step"] for x in m] == list(range(1, 7)) and all(np.isfinite(x["loss"]) for x in m)
    assert (tmp_path / "opts" / "final" / "pytorch_lora_weights.safetensors").exists()


def test_loss_weighting_hook_drops_samples(tmp_path, tiny_sd_dir):
    from guard_train.training.hooks import Hooks
    from guard_train.training.loop import Trainer

    seen = []

    def drop_first(ctx):
        seen.append((ctx.ids.clone(), ctx.per_sample_loss.detach().clone(), ctx.timesteps.clone()))
        w = torch.ones_like(ctx.per_sample_loss)
        w[0] = 0
        return w

    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": "hook", "train.max_steps": 3})),
                Hooks(loss_weighting=[drop_first]))
    t.train()
    t.close()
    m = read_metrics(tmp_path / "hook")
    assert [x["kept"] for x in m] == [0.75, 0.75, 0.75]
    assert len(seen) == 3 and all(len(ids) == 4 and per.shape == (4,) for ids, per, _ in seen)


def test_default_recipe_runs_with_its_mitigations(tmp_path, tiny_sd_dir):
    """recipe=tiny: entropy filter + duplicate-aware sampling (dedup at start), resumable exactly."""
    from guard_train.callbacks import train  # the loop with the callbacks cfg.eval asks for, as the CLI runs it
    from guard_train.lab.config import load_config

    extra = {"recipe": "tiny", "train.max_steps": 10, "train.checkpoint_every": 5,
             "mitigation.entropy_filter.warmup_steps": 4, "mitigation.entropy_filter.buckets": 2}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **extra, **{"run.name": "a"})))
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{**extra, "train.max_steps": 5}, **{"run.name": "b"})))
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **extra, **{"run.name": "b", "resume": "latest"})))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # filter thresholds + weighted sampler resume exactly
    assert [m.get("entropy_filter_kept") for m in a] == [m.get("entropy_filter_kept") for m in b]
    run = tmp_path / "a"
    assert (run / "entropy_filter_thresholds.json").exists() and (run / "dedup" / "clusters.jsonl").exists()
    w = np.load(run / "sampling_weights.npy")
    import json

    from guard_train.data.dedup import pairwise_precision_recall
    from guard_train.lab.dataset import read_manifest

    rows = [json.loads(l) for l in (run / "dedup" / "clusters.jsonl").read_text().splitlines()]
    truth = {it.id: it.instance for it in read_manifest(run / "data")}
    pr = pairwise_precision_recall([r["cluster"] for r in rows], [truth[r["id"]] for r in rows])
    assert pr["pair_precision"] == 1.0 and pr["pair_recall"] >= 0.8  # SSCD found the planted groups
    assert w.tolist() == [1.0 / r["cluster_size"] for r in rows]  # lab ids = dataset indices


def test_timestep_bias_weights_and_the_loop_draws_from_them(tmp_path, tiny_sd_dir):
    from guard_train.training.hooks import Hooks
    from guard_train.training.loop import Trainer
    from guard_train.training.losses import timestep_weights

    w = timestep_weights("later", 8, multiplier=3.0, portion=0.25)  # top 2 of 8 timesteps ×3: 6·1 + 2·3 = 12
    assert torch.allclose(w, torch.tensor([1, 1, 1, 1, 1, 1, 3, 3]) / 12)
    assert torch.allclose(timestep_weights("earlier", 4, 2.0, 0.5), torch.tensor([2, 2, 1, 1]) / 6)
    assert torch.allclose(timestep_weights("range", 5, 4.0, begin=1, end=3), torch.tensor([1, 4, 4, 1, 1]) / 11)
    assert torch.allclose(timestep_weights("none", 4, 9.0), torch.full((4,), 0.25))

    seen = []
    def record(ctx):
        return seen.append(ctx.timesteps.clone()) or torch.ones_like(ctx.per_sample_loss)

    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{
        "run.name": "bias", "train.max_steps": 3, "train.timestep_bias_strategy": "range",
        "train.timestep_bias_begin": 990, "train.timestep_bias_end": 1000, "train.timestep_bias_multiplier": 1e7})),
        Hooks(loss_weighting=[record]))
    t.train()
    t.close()
    ts = torch.cat(seen)
    assert len(ts) == 12 and bool((ts >= 990).all())  # P(t < 990) = 990 / (990 + 1e8) per draw


def test_init_lora_starts_from_the_given_weights(tmp_path, tiny_sd_dir):
    from safetensors.torch import load_file

    from guard_train.config.loader import ConfigError
    from guard_train.training.loop import Trainer

    common = {"train.mode": "lora", "train.lora_rank": 4, "train.learning_rate": 5e-3}
    train(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{"run.name": "a", "train.max_steps": 3})))
    final = tmp_path / "a" / "final"
    want = {k.removeprefix("unet."): v for k, v in load_file(final / "pytorch_lora_weights.safetensors").items()}
    t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **common, **{
        "run.name": "b", "train.max_steps": 1, "train.init_lora": str(final)})))
    t.setup()
    got = t._lora_state()
    t.close()
    assert len(got) == len(want) > 0
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)  # not the fresh gaussian init
    with pytest.raises(ConfigError, match="set train.lora_rank / lora_targets"):
        Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{**common, "train.lora_rank": 8,
                                                                     "run.name": "c",
                                                                     "train.init_lora": str(final)}))).setup()


def test_v_weight_cap_reweights_each_samples_loss(tmp_path, tiny_sd_dir):
    """Same seed, same first batch: the reweighted run's per-sample losses are the plain ones × min(1 + 1/SNR, cap)."""
    from guard_train.training.hooks import Hooks
    from guard_train.training.loop import Trainer
    from guard_train.training.losses import v_weights

    runs = {}
    for name, extra in (("plain", {}), ("v", {"train.v_weight_cap": 30.0})):
        seen = []
        def record(ctx):
            return seen.append((ctx.timesteps.clone(), ctx.per_sample_loss.detach().clone())) \
                or torch.ones_like(ctx.per_sample_loss)

        t = Trainer(load_config(small_lab_args(tmp_path, tiny_sd_dir, **{"run.name": name, "train.max_steps": 1,
                                                                         **extra})), Hooks(loss_weighting=[record]))
        t.train()
        runs[name] = (seen[0], t.noise_scheduler)
        t.close()
    (t0, plain), sched = runs["plain"]
    (t1, weighted), _ = runs["v"]
    assert torch.equal(t0, t1)
    w = v_weights(sched, t0, 30.0)
    assert torch.allclose(weighted, plain * w, rtol=1e-5) and float(w.max()) > 1.5  # not all-ones


def test_v_weight_cap_on_a_v_prediction_model_is_a_config_error(tmp_path, tiny_sd_dir):
    import shutil

    from guard_train.config.loader import ConfigError
    from guard_train.training.loop import Trainer

    model = tmp_path / "v_model"
    shutil.copytree(tiny_sd_dir, model)
    sc = model / "scheduler" / "scheduler_config.json"
    sc.write_text(json.dumps({**json.loads(sc.read_text()), "prediction_type": "v_prediction"}))
    t = Trainer(load_config(small_lab_args(tmp_path, model, **{"train.max_steps": 1, "train.v_weight_cap": 30.0})))
    with pytest.raises(ConfigError, match="drop train.v_weight_cap"):
        t.setup()
    t.close()
