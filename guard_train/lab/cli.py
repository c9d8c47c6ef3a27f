"""The lab's subcommands of `guard-train` (build-base, build-scorer, lab, make-lab): the lab is a client of the
core, so its commands live with it; `guard_train.cli` adds them to its parser. Like the core CLI, each command
imports what it runs when it runs, so `--help` and a refused argument return before torch loads."""

from __future__ import annotations

import sys
from pathlib import Path

from guard_train.config.params import COUNT, NON_NEG, POSITIVE, arg_type, bad_input

ROOT_DIR = Path(__file__).resolve().parents[2]
DOCS_CELLS = ROOT_DIR / "results" / "lab_cells"
PRETRAIN_FLAGS = ("out", "work", "steps", "time_budget_min", "init_from", "seed", "decay_from", "lr_min_ratio", "lr",
                  "snr_gamma", "v_weight_cap", "prediction_type", "zero_terminal_snr")


def add_commands(sub) -> dict:
    """Add the lab's subparsers to `sub`; returns {command: handler(args) -> exit code}."""
    count, seed = arg_type(int, COUNT), arg_type(int, NON_NEG)
    b = sub.add_parser("build-base", help="pretrain the embedded tiny SD (offline, long)")
    # defaults are PretrainConfig's (None = not given), so the CLI and the dataclass cannot drift apart
    b.add_argument("--out", help="exported model dir (default models/tiny-sd)")
    b.add_argument("--work", help="resumable trainer state (default runs/build-base)")
    b.add_argument("--steps", type=_pretrain_flag("steps"))
    b.add_argument("--minutes", dest="time_budget_min", type=_pretrain_flag("time_budget_min"),
                   help="time budget; export and stop when reached")
    b.add_argument("--init-from", help="continue from an exported model dir")
    b.add_argument("--seed", type=_pretrain_flag("seed"))
    b.add_argument("--decay-from", type=_pretrain_flag("decay_from"),
                   help="cosine-decay the lr from this step to --steps")
    b.add_argument("--lr-min-ratio", type=_pretrain_flag("lr_min_ratio"))
    b.add_argument("--lr", type=_pretrain_flag("lr"))
    b.add_argument("--snr-gamma", type=_pretrain_flag("snr_gamma"),
                   help="min-SNR-γ loss weighting (default 5); 0 = off (uniform)")
    b.add_argument("--v-weight-cap", type=_pretrain_flag("v_weight_cap"),
                   help="weight the ε-loss as a v-loss, min(1 + 1/SNR, cap); needs --snr-gamma 0")
    b.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="train this target; v_prediction converts an ε base (saved in the scheduler config)")
    b.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="rescale the betas to zero SNR at t = 999 and sample with trailing spacing (needs v)")
    sc = sub.add_parser("build-scorer", help="train the lab alignment scorer (attribute classifier)")
    sc.add_argument("--out", default="models/lab-scorer")
    sc.add_argument("--steps", type=count, default=1500)
    sc.add_argument("--seed", type=seed, default=0)
    lb = sub.add_parser("lab", help="the memorization lab benchmark: training and inference arms × seeds, one table")
    lb.add_argument("--size", choices=["smoke", "full"], default="smoke")
    lb.add_argument("--out", required=True, help="output dir (cells/ are kept: a rerun continues where it stopped)")
    lb.add_argument("--seeds", default="", help="comma-separated; default: the size's (full: 0,1,2)")
    lb.add_argument("--arms", default="", help="training arms, comma-separated (default: all)")
    lb.add_argument("--methods", default="", help="inference arms, comma-separated (default: all)")
    lb.add_argument("--model", default="models/tiny-sd")
    lb.add_argument("--backend", default="sscd", help="copy metric: sscd | sscd-distilled | pixel | "
                                                      "sscd-torchscript:<path> (TorchScript can run code: load only a "
                                                      "file you trust)")
    lb.add_argument("--infer-model", default="", help="inference arms' model: a LoRA dir (on the base its "
                                                      "build_info.json names, else --model), or 'plain' (the "
                                                      "plain arm of each seed); default: the size's (full: "
                                                      "models/tiny-sd-memorized-lora, smoke: plain)")
    lb.add_argument("--infer-guidance", type=arg_type(float, POSITIVE), default=None,
                    help="every inference method's guidance_scale (default: each method's own, 7.5)")
    lb.add_argument("--docs", action="store_true",
                    help="also write docs/lab-results.md, docs/figures/lab_{tradeoff,over_training}.png, "
                         "results/figures/lab_grid_*.jpg and the headline table in docs/results.md; cells in "
                         "results/lab_cells")
    lb.add_argument("--cells", default="", help="where finished (arm, seed) cells are kept and reused (default: "
                                                "OUT/cells, or results/lab_cells with --docs)")
    ml = sub.add_parser("make-lab", help="write the lab dataset (imagefolder or parquet) with its manifest")
    ml.add_argument("--out", required=True)
    ml.add_argument("--format", choices=["imagefolder", "parquet"], default="imagefolder")
    ml.add_argument("--set", nargs="*", default=[], help="lab options as key=value (see LabConfig)")
    return {"build-base": build_base_cmd, "build-scorer": build_scorer_cmd, "lab": lab_cmd, "make-lab": make_lab_cmd}


def build_base_cmd(args) -> int:
    from guard_train.config.loader import ConfigError
    from guard_train.lab.pretrain import PretrainConfig, build_base

    cfg = PretrainConfig(**{k: getattr(args, k) for k in PRETRAIN_FLAGS if getattr(args, k) is not None})
    try:
        build_base(cfg)  # refuses bad flags, or a loaded model's clashing schedule, before writing anything
    except ConfigError as e:
        return bad_input(e)
    return 0


def build_scorer_cmd(args) -> int:
    import json

    import numpy as np

    from guard_train.config.paths import PathError, check_out_dir
    from guard_train.lab.aligner import evaluate, train_scorer
    from guard_train.lab.dataset import LabConfig, build_lab

    try:
        check_out_dir(args.out, own_files=("model.safetensors",))
    except PathError as e:
        return bad_input(e)
    aligner = train_scorer(steps=args.steps, seed=args.seed)
    lab_obj = build_lab(LabConfig(num_instances=96, held_out=0, dup_fraction=0))
    aligner.info["heldout_lab"] = evaluate(aligner, np.stack(lab_obj.images), [i.caption for i in lab_obj.items])
    aligner.save(args.out)
    print(json.dumps(aligner.info, indent=1))
    return 0


def make_lab_cmd(args) -> int:
    from dataclasses import fields

    from guard_train.config.params import field_range, parse, type_hints
    from guard_train.config.paths import check_out_dir, mark_ours
    from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder, write_parquet

    kw = {}
    known, hints = {f.name: f for f in fields(LabConfig)}, type_hints(LabConfig)
    try:  # each value parsed and range-checked as LabConfig declares it, then the whole config validated
        check_out_dir(args.out, own_files=("manifest.jsonl", "train.parquet"))
        for kv in args.set:
            k, sep, v = kv.partition("=")
            if k not in known or not sep:
                raise ValueError(f"--set {kv!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
            kw[k] = parse(f"--set {k}", v, hints[k], field_range(known[k]))
        lab_obj = build_lab(LabConfig(**kw))
    except ValueError as e:
        return bad_input(e)
    mark_ours(Path(args.out))
    path = write_imagefolder(lab_obj, args.out) if args.format == "imagefolder" else write_parquet(
        lab_obj, f"{args.out}/train.parquet")
    print(f"wrote {len(lab_obj.items)} items ({sum(i.is_dup for i in lab_obj.items)} "
          f"from duplicated instances) to {path}")
    return 0


def lab_cmd(args) -> int:
    import shlex
    import shutil
    import time

    from guard_train.config.loader import resolve_model_path
    from guard_train.config.paths import PathError, check_out_dir, mark_ours
    from guard_train.lab.bench import HEADLINE_END, HEADLINE_START, TABLE_END, TABLE_START, replace_marked, run_lab

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:  # a rerun continues in its own --out (cells/, results.json); a user's folder is refused
        out = check_out_dir(args.out, own_files=("results.json", "cells", "lab-results.md"))
    except PathError as e:
        return bad_input(e)
    # --out is created by run_lab once the arguments are valid: bad input writes nothing
    # the documented table's cells are committed beside it, so any checkout can rebuild or continue that run
    cells = Path(args.cells) if args.cells else (DOCS_CELLS if args.docs else None)
    t0 = time.time()
    try:
        res = run_lab(args.size, out, [int(x) for x in split(args.seeds)] or None, split(args.arms) or None,
                      split(args.methods) or None, resolve_model_path(args.model), args.backend,
                      infer_model=args.infer_model or None, cells_dir=cells, infer_guidance=args.infer_guidance)
    except ValueError as e:
        return bad_input(e)
    mark_ours(out)
    cmd = "guard-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = (out / "lab-results.md").read_text()
    how = (f"Command: `{cmd}`. Wall time: {res['wall_s_cells'] / 60:.1f} min summed "
           f"over the {res['cells_total']} (arm, seed) cells; "
           f"this invocation {res['wall_s_this_invocation'] / 60:.1f}"
           f" min ({res['cells_reused']} cells reused from an earlier invocation of the same settings).\n\n")
    (out / "lab-results.md").write_text("# Lab benchmark results\n\n" + how + md)
    if args.docs:
        figs = ROOT_DIR / "docs" / "figures"
        for f in ("tradeoff.png", "over_training.png"):
            shutil.copy(out / f, figs / f"lab_{f}")
        from PIL import Image

        grids = ROOT_DIR / "results" / "figures"  # measurement artifacts live apart from the docs
        grids.mkdir(parents=True, exist_ok=True)
        for g in sorted((out / "grids").glob("*.png")):  # JPEG copies (a quarter of the size)
            Image.open(g).convert("RGB").save(grids / f"lab_grid_{g.stem}.jpg", "JPEG", quality=92)
        text = how + md.replace("`tradeoff.png`", "`docs/figures/lab_tradeoff.png`").replace(
            "`over_training.png`", "`docs/figures/lab_over_training.png`").replace(
            "`grids/`", "`results/figures/lab_grid_*`")
        # both pages hold hand-written sections too: only the marked blocks are rewritten
        for page, block, start, end in (
                ("lab-results.md", text.rstrip(), TABLE_START, TABLE_END),
                ("results.md", (out / "headline.md").read_text().rstrip(), HEADLINE_START, HEADLINE_END)):
            path = ROOT_DIR / "docs" / page
            try:
                path.write_text(replace_marked(path.read_text(), block, start, end))
            except ValueError as e:
                print(f"warning: docs/{page} not updated ({e}); the table is in {out}", file=sys.stderr)
    print(md)
    print(f"wrote {out}/results.json, lab-results.md, headline.md, tradeoff.png, over_training.png, grids/ "
          f"({(time.time() - t0) / 60:.1f} min)")
    return 0


def _pretrain_flag(name: str):
    """A build-base flag's argparse type: PretrainConfig's type and declared range for that field, imported only
    when the flag is given (the model stack is slow to import; `--help` should not wait for it)."""
    def conv(text: str):
        from guard_train.config.params import dataclass_arg_type
        from guard_train.lab.pretrain import PretrainConfig

        return dataclass_arg_type(PretrainConfig, name)(text)

    conv.__name__ = name
    return conv
