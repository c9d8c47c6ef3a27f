"""`guard-train` and `train.py`: a thin CLI over plain functions. Config errors exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from guard_train.config.params import COUNT, NON_NEG, OPEN_UNIT, arg_type, bad_input


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    # diffusers imports bitsandbytes whenever it is installed (for adamw8bit); on a CPU with AVX512-BF16 its CPU
    # backend then logs that the optional `kernels` package is missing — a warning about a 4-bit kernel we never
    # use, which a new user reads as a broken install. Drop that one message, at its logger, before the import.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_warning)


def _register_lab() -> None:
    """The CLI is the lab's client: its committed attribute scorer becomes the default alignment scorer of
    `eval` and the memorization callback (the core itself knows no lab)."""
    import guard_train.lab.aligner  # noqa: F401  (registers the scorer)


def _drop_kernels_warning(record) -> bool:
    return "kernels" not in record.getMessage()


def train_main(argv: list[str]) -> int:
    """`train.py recipe=NAME key=value …` (under `accelerate launch` or plain python)."""
    _quiet()
    from guard_train.config.loader import ConfigError
    from guard_train.data.loaders import DataError
    from guard_train.lab.config import load_config
    from guard_train.models.loading import ModelLoadError

    if any(a in ("-h", "--help") for a in argv):
        from guard_train.config.loader import all_keys
        from guard_train.lab.config import LabRunConfig

        print("usage: train.py recipe=NAME [key.sub=value ...]\nkeys:\n  " + "\n  ".join(all_keys(LabRunConfig)))
        return 0
    from guard_train.callbacks import build_callbacks
    from guard_train.training.loop import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted, Trainer

    trainer = None
    try:
        cfg = load_config(argv)
        _register_lab()
        from guard_train.lab.summary import format_summary, run_summary

        trainer = Trainer(cfg, build_callbacks(cfg))
        result = trainer.train()
        summary = run_summary(trainer)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted:
        trainer.close()
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    main = trainer.acc.is_main_process
    trainer.close()
    if main:
        print(f"\nrun directory: {result['run_dir']}\n  final weights: {result['final']}\n"
              f"  metrics: {result['run_dir']}/metrics.jsonl   config: {result['run_dir']}/config.yaml")
        if cfg.summary.enabled:
            print(format_summary(summary))
        from guard_train.callbacks.memorization import MemorizationCallback

        for cb in trainer.hooks.callbacks:
            if isinstance(cb, MemorizationCallback) and cb.history:
                print(cb.summary_table())
                print(f"  report: {result['run_dir']}/memorization/report.html (per-evaluation metrics.json and grids "
                      f"beside it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet()  # before anything imports the model stack
    parser, commands = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "train":
        return train_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return commands[args.cmd](args)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """`guard-train`'s parser and {command: handler(args) -> exit code}; the lab adds its own commands."""
    from guard_train.lab.cli import add_commands as add_lab_commands

    p = argparse.ArgumentParser(prog="guard-train", exit_on_error=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="fine-tune (single process; use `accelerate launch train.py` for several)",
                   add_help=False)
    commands = {}
    for add in (_add_dedup, _add_generate, _add_detect, _add_eval, _add_status, _add_tables):
        commands |= add(sub)
    return p, commands | add_lab_commands(sub)


def _add_dedup(sub) -> dict:
    dd = sub.add_parser("dedup", help="find near-duplicate clusters in a training set; writes clusters.jsonl")
    dd.add_argument("--data", required=True, help="dataset path (dir, file or glob)")
    dd.add_argument("--source", default="imagefolder",
                    choices=["imagefolder", "parquet", "hf_disk", "webdataset", "img2dataset"])
    dd.add_argument("--image-column", default="image")
    dd.add_argument("--caption-column", default="text")
    dd.add_argument("--id-column", default="")
    dd.add_argument("--backend", default="sscd", help="sscd | sscd-distilled | phash | pixel | sscd-torchscript:<path> "
                                                      "(TorchScript can run code: load only a file you trust)")
    dd.add_argument("--threshold", type=arg_type(float, NON_NEG), default=0.0,
                    help="0 = backend default (SSCD 0.6, pHash 8 bits)")
    dd.add_argument("--out", required=True)
    dd.add_argument("--manifest", default="", help="lab manifest.jsonl (or the lab dir holding it): also report "
                                                   "precision/recall vs planted groups")
    return {"dedup": _dedup_cmd}


def _sampling_flags(p) -> None:
    """--num-images / --steps / --seed and the sampler flags, shared by every command that generates."""
    p.add_argument("--num-images", type=arg_type(int, COUNT), default=4)
    p.add_argument("--steps", type=arg_type(int, COUNT), default=50)
    p.add_argument("--seed", type=arg_type(int, NON_NEG), default=0)
    _sampler_flags(p)


def _add_generate(sub) -> dict:
    g = sub.add_parser("generate", help="generate with GUARD or a baseline mitigation; PNGs + generations.jsonl")
    g.add_argument("--model", default="models/tiny-sd")
    g.add_argument("--lora", default="")
    g.add_argument("--prompts", required=True, help="a text file (one prompt per line) or a prompt")
    g.add_argument("--method", default="guard")
    g.add_argument("--param", action="append", default=[], metavar="K=V", help="method hyper-parameter (repeatable)")
    _sampling_flags(g)
    g.add_argument("--max-batch", type=arg_type(int, COUNT), default=64)
    g.add_argument("--out", required=True)
    return {"generate": _generate_cmd}


def _add_detect(sub) -> dict:
    de = sub.add_parser("detect", help="memorization detection scores per prompt; CSV + AUROC summary")
    de.add_argument("--model", default="models/tiny-sd")
    de.add_argument("--lora", default="")
    de.add_argument("--prompts", required=True, help="jsonl with prompt + label (1 = memorized), e.g. the lab's "
                                                      "detect_prompts.jsonl")
    _sampling_flags(de)
    de.add_argument("--out", required=True)
    return {"detect": _detect_cmd}


def _add_eval(sub) -> dict:
    count = arg_type(int, COUNT)
    ev = sub.add_parser("eval", help="score checkpoints x methods for memorization; --fail-if gates (exit 1)")
    ev.add_argument("--model", default="models/tiny-sd", help="base model")
    ev.add_argument("--lora", action="append", default=[], help="LoRA dir (repeatable)")
    ev.add_argument("--run", default="", help="a training run dir: evaluate every complete checkpoint and final/")
    ev.add_argument("--prompts", default="", help="jsonl/txt prompts (default: the lab reference's prompt groups)")
    ev.add_argument("--reference", required=True, help="lab dir or dataset of the training images")
    ev.add_argument("--methods", default="cfg,guard")
    _sampling_flags(ev)
    ev.add_argument("--prompts-per-group", type=count, default=8)
    ev.add_argument("--threshold", type=arg_type(float, OPEN_UNIT), default=0.5)
    ev.add_argument("--backend", default="sscd", help="sscd | sscd-distilled | sscd-torchscript:<path> | pixel "
                                                      "(TorchScript can run code: load only a file you trust)")
    ev.add_argument("--clip-model", default="", help="local transformers CLIPModel dir: adds a clip_score column")
    ev.add_argument("--max-batch", type=count, default=64)
    ev.add_argument("--fail-if", action="append", default=[], metavar="COND", help='e.g. "duplicated.copy_rate>0.05"')
    ev.add_argument("--out", required=True)
    return {"eval": _eval_cmd}


def _add_status(sub) -> dict:
    stp = sub.add_parser("status", help="what happened to a training run; exit 0 done, 75 preempted (requeue), "
                                        "1 failed or a rank died, 3 running")
    stp.add_argument("run_dir")
    return {"status": _status_cmd}


def _add_tables(sub) -> dict:
    me = sub.add_parser("methods", help="the inference methods and every parameter: default, range, meaning")
    me.add_argument("--markdown", action="store_true", help="as the Markdown table in docs/inference.md")
    mi = sub.add_parser("mitigations", help="the training mitigations and every key: default, range, meaning")
    mi.add_argument("--markdown", action="store_true", help="as the Markdown table in docs/mitigations.md")
    return {"methods": _methods_cmd, "mitigations": _mitigations_cmd}


def _eval_cmd(args) -> int:
    import torch.distributed as dist

    from guard_train.eval.command import run_eval

    _register_lab()
    rc = run_eval(args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return rc


def _status_cmd(args) -> int:
    from guard_train.training.status import run_exit_code

    try:
        code, lines = run_exit_code(Path(args.run_dir))
    except FileNotFoundError as e:
        return bad_input(e)
    print("\n".join(lines))
    return code


def _methods_cmd(args) -> int:
    from guard_train.guidance import params_doc

    if args.markdown:
        print(params_doc.markdown())
        return 0
    for m in params_doc.METHODS:
        print(m)
        for name, typ, default, allowed, doc, _ in params_doc.rows(m):
            print(f"  {name}: {typ} = {default}  [{allowed}]  {doc}")
    return 0


def _mitigations_cmd(args) -> int:
    from guard_train.training.mitigations import table

    print(table.markdown() if args.markdown else table.text())
    return 0


def _sampler_flags(p) -> None:
    """--scheduler / --eta, declared once for every command that samples (guidance/schedulers.py)."""
    from guard_train.config.params import Range, arg_type
    from guard_train.guidance.schedulers import CHOICES, DEFAULT

    p.add_argument("--scheduler", choices=CHOICES, default=DEFAULT,
                   help="sampler built from the model dir's scheduler config (default ddim, the papers'; model = "
                        "the dir's own)")
    p.add_argument("--eta", type=arg_type(float, Range(ge=0, le=1)), default=0.0, help="DDIM's eta (0 = deterministic)")
    p.add_argument("--device", default="auto", help="auto (a CUDA device when there is one, else the CPU; under "
                   "accelerate launch, each process's own) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="weights and activations (fp16 needs CUDA)")


def _generate_cmd(args) -> int:
    import json

    from PIL import Image

    from guard_train.config.loader import ConfigError, check_model_arg
    from guard_train.config.paths import PathError, check_lora_input, check_out_dir, mark_ours
    from guard_train.guidance.base import ParamError
    from guard_train.guidance.engine import GuidanceEngine
    from guard_train.guidance.schedulers import check_sampler
    from guard_train.guidance.strategies import get_strategy
    from guard_train.models.loading import ModelLoadError, placement

    params = {}
    try:  # every input checked before the model loads or anything is written
        out = check_out_dir(args.out, own_files=("generations.jsonl",))
        prompts = _prompts_arg(args.prompts)
        for kv in args.param:
            k, sep, v = kv.partition("=")
            if not sep:
                raise ParamError(f"--param expects K=V, got {kv!r}")
            params[k] = v
        get_strategy(args.method, **params)
        check_sampler(args.scheduler, args.eta)
        model = check_model_arg(args.model)
        if args.lora:
            check_lora_input(args.lora, "--lora")
        device, dtype = placement(args.device, args.dtype)
        engine = GuidanceEngine.from_pretrained(model, lora=args.lora or None, max_batch=args.max_batch,
                                                scheduler=args.scheduler, eta=args.eta, device=device, dtype=dtype)
        res = engine.generate(prompts, method=args.method, num_images=args.num_images, seed=args.seed,
                              steps=args.steps, progress=True, **params)
    except (ParamError, ModelLoadError, PathError, ConfigError) as e:
        return bad_input(e)
    mark_ours(out)
    lines = []
    for img, rec in zip(res.images, res.records):
        name = f"p{rec['prompt_index']:04d}_i{rec['image_index']:02d}.png"
        Image.fromarray(img).save(out / name)
        lines.append(json.dumps({"file": name, **rec}) + "\n")
    _write_atomic(out / "generations.jsonl", "".join(lines))  # last: a complete jsonl means every PNG is there
    print(f"wrote {len(res.images)} images and generations.jsonl to {out}")
    return 0


def _prompts_arg(value: str) -> list[str]:
    """--prompts: a text file (one prompt per line) when such a file exists, else the prompt itself."""
    from guard_train.config.paths import PathError, read_text_input

    p = Path(value)
    if p.exists():
        text = read_text_input(value, "--prompts", "a text file with one prompt per line")
        return [l.strip() for l in text.splitlines() if l.strip()]
    if not value.strip():
        raise PathError("--prompts is empty; give a prompt or a text file with one prompt per line")
    return [value]


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename into place: an interrupted command never leaves a half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _detect_cmd(args) -> int:
    import csv
    import json

    import numpy as np

    from guard_train.config.loader import ConfigError, check_model_arg
    from guard_train.config.paths import PathError, check_lora_input, check_out_dir, mark_ours, read_jsonl_input
    from guard_train.eval.evaluate import detection_scores
    from guard_train.guidance.engine import GuidanceEngine
    from guard_train.metrics.detection import summarize
    from guard_train.models.loading import ModelLoadError, placement

    try:
        out = check_out_dir(args.out, own_files=("summary.json", "scores.csv"))
        what = 'a jsonl file: {"prompt": ..., "label": 0|1} per line'
        rows = read_jsonl_input(args.prompts, "--prompts", what, keys=("prompt", "label"))
        if any(r["label"] not in (0, 1) for r in rows):
            raise PathError(f"--prompts {args.prompts!r}: every 'label' must be 0 or 1; give {what}")
        prompts, labels = [str(r["prompt"]) for r in rows], np.array([int(r["label"]) for r in rows])
        model = check_model_arg(args.model)
        if args.lora:
            check_lora_input(args.lora, "--lora")
    except (PathError, ConfigError) as e:
        return bad_input(e)
    try:
        device, dtype = placement(args.device, args.dtype)
        eng = GuidanceEngine.from_pretrained(model, lora=args.lora or None, scheduler=args.scheduler, eta=args.eta,
                                             device=device, dtype=dtype)
    except ModelLoadError as e:
        return bad_input(e)
    scores, per_prompt_s = detection_scores(eng, prompts, args.num_images, args.steps, args.seed)
    mark_ours(out)
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label", *scores])
        for i, p in enumerate(prompts):
            w.writerow([p, int(labels[i]), *[f"{scores[k][i]:.6g}" for k in scores]])
    summary = {"prompts": len(prompts), "memorized": int(labels.sum()), "images_per_prompt": args.num_images,
               "steps": args.steps, "wall_s_per_prompt": round(per_prompt_s, 3)}
    if 0 < labels.sum() < len(labels):
        summary["scores"] = {k: summarize(v, labels) for k, v in scores.items()}
    _write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _dedup_cmd(args) -> int:
    import json
    import shutil
    import time

    from guard_train.config.paths import PathError, check_out_dir, mark_ours
    from guard_train.data.dedup import dedup_dataset, pairwise_precision_recall
    from guard_train.data.loaders import DataError, build_dataset, image_transform

    t0 = time.time()
    fresh = False
    try:  # the backend, the output and the manifest are checked before any image is decoded or embedded
        out = check_out_dir(args.out, own_files=("clusters.jsonl", "dedup_summary.json"))
        _check_dedup_backend(args.backend)
        truth = _read_manifest_arg(args.manifest) if args.manifest else None
        ds = build_dataset(args.source, args.data, args.image_column, args.caption_column, args.id_column,
                           image_transform(256, True, False))
        missing = [int(i) for i in ds.item_ids() if int(i) not in truth] if truth is not None else []
        if missing:
            raise DataError(f"--manifest {args.manifest!r} does not list items {missing[:5]} of --data; give the "
                            f"manifest of this dataset")
        fresh = not out.exists()
        mark_ours(out)  # embeddings stream chunk by chunk into out/cache: a rerun resumes at the first missing one
        res, bad = dedup_dataset(ds, args.backend, args.threshold, cache=out / "cache")
        ids = res.ids
    except (DataError, FileNotFoundError) as e:
        if fresh and out.exists():  # no image could be decoded: leave nothing behind
            shutil.rmtree(out)
        return bad_input(e if args.data in str(e) else f"--data {args.data!r}: {e}")
    except PathError as e:
        return bad_input(e)
    except ValueError as e:  # the backend's own refusal (e.g. a TorchScript file that is not SSCD)
        return bad_input(f"--backend {args.backend!r}: {e}")
    res.write(out)
    summ = {**res.summary(), "undecodable": len(bad), "wall_s": round(time.time() - t0, 1)}
    if truth is not None:
        summ["vs_planted"] = pairwise_precision_recall(res.cluster, [truth[int(i)] for i in ids])
    _write_atomic(out / "dedup_summary.json", json.dumps(summ, indent=1))
    print(f"{summ['items']} items, {summ['clusters']} clusters ({summ['duplicate_clusters']} with duplicates, "
          f"{summ['items_in_duplicate_clusters']} items in them); backend {res.backend}, threshold {res.threshold}")
    for c in summ["largest"]:
        print(f"  cluster {c['cluster']}: {c['size']} items")
    if "vs_planted" in summ:
        v = summ["vs_planted"]
        print(f"vs planted duplicates: pair precision {v['pair_precision']:.3f}, pair recall {v['pair_recall']:.3f}")
    print(f"wrote {out / 'clusters.jsonl'}")
    return 0


DEDUP_BACKENDS = ("sscd", "sscd-distilled", "phash", "pixel")


def _check_dedup_backend(backend: str) -> None:
    from guard_train.config.paths import PathError

    if backend.startswith("sscd-torchscript:"):
        path = backend.split(":", 1)[1]
        if not Path(path).is_file():
            raise PathError(f"--backend {backend!r}: TorchScript file {path!r} does not exist")
        return
    if backend not in DEDUP_BACKENDS:
        raise PathError(f"--backend {backend!r} is not a backend; use {', '.join(DEDUP_BACKENDS)} or "
                        f"sscd-torchscript:<path>")


def _read_manifest_arg(value: str) -> dict[int, int]:
    """--manifest: the lab's manifest.jsonl itself, or the lab dir holding it → {item id: instance}."""
    from guard_train.config.paths import PathError, read_jsonl_input

    p = Path(value)
    path = p / "manifest.jsonl" if p.is_dir() else p
    what = "a lab manifest.jsonl (written by make-lab) or its lab dir"
    rows = read_jsonl_input(str(path), "--manifest", what, keys=("id", "instance"))
    try:
        return {int(r["id"]): int(r["instance"]) for r in rows}
    except (TypeError, ValueError) as e:
        raise PathError(f"--manifest {str(path)!r}: 'id' and 'instance' must be integers ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
