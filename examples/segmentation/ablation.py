"""The ablation: the paper's Tables 1 and 3 over the pipeline's stages, several seeds.

    python -m examples.segmentation.ablation --out docs/ablation       # digit scenes, CPU

trains the teacher and the translator once (seed 0), then for each seed a
student per row of the paper's Tables 1 and 3: alone, with KD at three
temperatures, with FitNet, with each of the paper's terms alone and with both
(``--rows`` adds attention transfer, pair-wise and channel-wise
distillation), all by the same functions as ``python -m examples.segmentation``.
The paper's terms run once per weight given (``--beta``, ``--gamma``; by
default the paper's 50 and 1). Writes to ``--out`` the ``results.json`` (every
run), ``summary.md`` (mean ± sample standard deviation over seeds, and the
weighted loss terms at the start and the end of training) and ``ablation.png``;
the models, checkpoints and logs go under ``--runs``.
Every other flag of the pipeline applies (``--dataset``, ``--distill-steps``,
...); the defaults are the dataset's, digits by default.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from examples.segmentation import config as configs
from examples.segmentation import stages
from examples.segmentation.cli import make_run
from examples.segmentation.evaluation import evaluate
from examples.segmentation.methods import TRANSLATOR_METHODS
from examples.segmentation.reporting import footer, machine, visualize
from examples.segmentation.run import Run, resume_record
from segdistill import load_checkpoint

PAPER_BETA, PAPER_GAMMA = 50.0, 1.0
"""The paper's stage-2 weights of the adaptation and the affinity term."""

ROWS: dict[str, tuple[str, dict[str, float]]] = {
    "student": ("student", {}),
    "kd_T2": ("kd", {"kd_temperature": 2.0}),
    "kd_T4": ("kd", {"kd_temperature": 4.0}),
    "kd_T6": ("kd", {"kd_temperature": 6.0}),
    "fitnet": ("fitnet", {}),
    "attention": ("attention_transfer", {}),
    "pairwise": ("pairwise", {}),
    "cwd": ("cwd", {}),
    "dist": ("dist", {}),
    "mgd": ("mgd", {}),
    "ifvd": ("ifvd", {}),
    "cirkd": ("cirkd", {}),
    "holistic": ("holistic", {}),
    "affinity": ("knowledge_adaptation", {"adaptation_weight": 0.0}),
    "adaptation": ("knowledge_adaptation", {"affinity_weight": 0.0}),
    "adaptation+affinity": ("knowledge_adaptation", {}),
}
"""Each row: the pipeline's method (``student``: no distillation) and the config fields
it sets. The weights of the paper's terms come from ``--beta``/``--gamma``."""

PAPER_ROWS = ("student", "kd_T2", "kd_T4", "kd_T6", "fitnet", "affinity", "adaptation",
              "adaptation+affinity")
"""The rows of the paper's Tables 1 and 3, the default."""

METHOD_ROWS = ("student", "kd_T4", "fitnet", "attention", "pairwise", "cwd", "dist", "mgd",
               "ifvd", "cirkd", "holistic", "adaptation+affinity")
"""One row per pipeline method, each at its preset's reference weights (``--rows every``)."""


def variants(row: str, betas: Sequence[float], gammas: Sequence[float]
             ) -> list[tuple[str, dict[str, float]]]:
    """(label, config fields) for each weight setting ``row`` runs with.

    The paper's terms run once per weight given for them (``adaptation`` per
    beta, ``affinity`` per gamma, both per pair); the label names the weights
    where more than one was given. Other rows run once.

    Example:
        >>> variants("affinity", [50.0], [1.0, 10.0])
        [('affinity (gamma=1)', {'adaptation_weight': 0.0, 'affinity_weight': 1.0}), \
('affinity (gamma=10)', {'adaptation_weight': 0.0, 'affinity_weight': 10.0})]
    """
    method, fixed = ROWS[row]
    if method != "knowledge_adaptation":
        return [(row, dict(fixed))]
    uses_beta, uses_gamma = "adaptation" in row, "affinity" in row
    out = []
    for beta in betas if uses_beta else [0.0]:
        for gamma in gammas if uses_gamma else [0.0]:
            parts = ([f"beta={beta:g}"] if uses_beta and len(betas) > 1 else []) + (
                [f"gamma={gamma:g}"] if uses_gamma and len(gammas) > 1 else [])
            label = f"{row} ({', '.join(parts)})" if parts else row
            out.append((label, {"adaptation_weight": beta, "affinity_weight": gamma}))
    return out


def _folder(label: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() or c in "+=._-" else "_" for c in label).strip("_")
    return f"ablation/seed{seed}/{slug.replace('__', '_')}"


def loss_scales(history: list[dict[str, float]], window: int = 50
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Each logged loss term (already weighted) averaged over the first and the last
    ``window`` steps: how large each term is beside the cross-entropy."""

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = [k for k in rows[0] if k not in ("step", "lr")]
        return {k: sum(r[k] for r in rows) / len(rows) for k in keys}

    if not history:
        return {}, {}
    return mean(history[:window]), mean(history[-window:])


def format_scales(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the weighted loss terms at the start and the end of
    training, averaged over seeds, one line per distilled row."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if set(row.get("terms_start", {})) - {"loss", "ce"}:  # a distillation term was logged
            by_label.setdefault(row["method"], []).append(row)
    if not by_label:
        return ""
    lines = ["| method | term | first 50 steps | last 50 steps |", "|---|---|---:|---:|"]
    for label, group in by_label.items():
        for key in group[0]["terms_start"]:
            start = sum(r["terms_start"][key] for r in group) / len(group)
            end = sum(r["terms_end"][key] for r in group) / len(group)
            lines.append(f"| {label} | {key} | {start:.4g} | {end:.4g} |")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation of mIoU per row label, in order of appearance."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["method"], []).append(row)
    summary = []
    for label, group in by_label.items():
        values = [r["miou"] for r in group]
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if len(values) > 1 else float("nan"))
        summary.append({"method": label, "runs": len(values), "miou_mean": mean,
                        "miou_std": std, "params": group[0]["params"],
                        "flops": group[0]["flops"]})
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mIoU in percent)."""
    lines = ["| method | runs | val mIoU (%) | params | MFLOPs / image |",
             "|---|---:|---:|---:|---:|"]
    for s in summary:
        std = "" if math.isnan(s["miou_std"]) else f" ± {100 * s['miou_std']:.2f}"
        lines.append(f"| {s['method']} | {s['runs']} | {100 * s['miou_mean']:.2f}{std} | "
                     f"{s['params']:,} | {s['flops'] / 1e6:.1f} |")
    return "\n".join(lines)


def _finished(run: Run, folder: str) -> tuple[dict[str, Any], list[dict[str, float]]] | None:
    """The evaluation and the training history of a row already trained and evaluated
    under ``folder`` with the same settings (a stopped ablation rerun continues where it
    stopped), else ``None``."""
    out = run.out / folder
    if not ((out / "eval.json").is_file() and (out / "model.pt").is_file()
            and (out / "checkpoint.pt").is_file()):
        return None
    state = load_checkpoint(out / "checkpoint.pt")
    kind = "student" if folder.endswith("/student") else "distill"
    steps = run.config.student_steps if kind == "student" else run.config.distill_steps
    record = {**resume_record(run, kind), "processes": run.world_size}
    saved = dict(state.get("config") or {})
    defaults = configs.PipelineConfig()
    for flag in set(record) - set(saved):  # a flag added since, at its default: the same run
        saved[flag] = getattr(defaults, flag[2:].replace("-", "_"), None)
    if int(state["step"]) != steps or saved != record:
        return None  # another run's settings: trained again (and overwritten)
    return json.loads((out / "eval.json").read_text()), list(state["history"])


def run_ablation(run: Run, out: Path, rows: Sequence[str], seeds: Sequence[int],
                 betas: Sequence[float], gammas: Sequence[float],
                 figure: bool = True, reuse: bool = False) -> dict[str, Any]:
    """Train the teacher and (if a row needs it) the translator once, then every row for
    every seed; evaluate each model. Writes ``results.json`` (and the figure) to ``out``
    and returns what it holds. With ``reuse``, a teacher and a translator already
    trained under ``run.out`` are taken as they are. A row already trained and evaluated
    with the same number of steps under ``run.out`` (a stopped ablation, rerun) is read
    back instead of trained again."""
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; expected some of {', '.join(ROWS)}")
    t0 = time.perf_counter()
    if not (reuse and (run.out / "teacher" / "model.pt").is_file()):
        stages.train_teacher(run)
    if any(ROWS[r][0] in TRANSLATOR_METHODS for r in rows) and not (
            reuse and (run.out / "translator" / "model.pt").is_file()):
        stages.train_translator_stage(run)
    teacher = evaluate(run, "teacher", echo=False)
    results: dict[str, Any] = {"config": asdict(run.config), "machine": machine(),
                               "rows": [{**teacher, "method": "teacher", "seed": run.config.seed}]}
    shown: dict[str, str] = {"teacher": "teacher"}
    for seed in seeds:
        for row in rows:
            method, _ = ROWS[row]
            for label, fields in variants(row, betas, gammas):
                seeded = run.with_config(seed=seed, **fields)
                folder = _folder(label, seed)
                finished = _finished(seeded, folder)
                if finished is not None:  # a rerun of the same command: taken as it is
                    scores, history = finished
                else:
                    history = (stages.train_student(seeded, folder) if method == "student"
                               else stages.distill(seeded, method, folder))
                    scores = evaluate(seeded, folder, echo=False)
                start, end = loss_scales(history)
                results["rows"].append({**scores, "method": label, "seed": seed,
                                        "weights": fields, "terms_start": start,
                                        "terms_end": end})
                print(f"{label}, seed {seed}: val mIoU {100 * scores['miou']:.2f}", flush=True)
                if seed == seeds[0]:
                    shown[label] = folder
    results["seconds"] = time.perf_counter() - t0
    results["summary"] = summarize(results["rows"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if figure and run.main:
        results["figure"] = str(visualize(run, shown, path=out / "ablation.png"))
    return results


def merge_results(folders: Sequence[Path]) -> dict[str, Any]:
    """The rows of several ablation runs' ``results.json`` as one result: the teacher's
    row once (they must share it: the same teacher), every other row as it was; the
    time is the sum of the runs' (the runs may have run side by side).

    Raises:
        ValueError: a folder has no results, or the runs had different teachers.
    """
    parts = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"no results.json in {folder}")
        parts.append(json.loads(path.read_text()))
    teachers = [next(r for r in p["rows"] if r["method"] == "teacher") for p in parts]
    if any(t["miou"] != teachers[0]["miou"] for t in teachers[1:]):
        raise ValueError("the runs to merge had different teachers (their teacher mIoUs "
                         f"differ: {[t['miou'] for t in teachers]}); train them with "
                         "--reuse-teacher on one --runs folder")
    rows = [teachers[0]] + [r for p in parts for r in p["rows"] if r["method"] != "teacher"]
    merged = {"config": parts[0]["config"], "machine": parts[0]["machine"], "rows": rows,
              "seconds": sum(p["seconds"] for p in parts), "merged_from": [str(f) for f in folders]}
    merged["summary"] = summarize(rows)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``python -m examples.segmentation.ablation``."""
    p = argparse.ArgumentParser(prog="python -m examples.segmentation.ablation",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(configs.CONFIGS), default="digits")
    p.add_argument("--root", type=Path, help="the dataset's root folder (VOC, Cityscapes)")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"),
                   help="where the results go (default runs/ablation)")
    p.add_argument("--runs", type=Path, help="where the models, checkpoints and logs go "
                   "(default: --out)")
    p.add_argument("--rows", nargs="+", choices=[*ROWS, "every"], default=list(PAPER_ROWS),
                   help=f"rows to train (default: the paper's, {' '.join(PAPER_ROWS)}; "
                   f"'every': one per method, {' '.join(METHOD_ROWS)})")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="train nothing: merge the results.json of earlier runs (e.g. one "
                   "seed each, run side by side) into one summary in --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="student seeds (default 0 1 2)")
    p.add_argument("--beta", type=float, nargs="+", default=[PAPER_BETA],
                   help="adaptation weights (default the paper's 50); several values run "
                   "the adaptation rows once per value")
    p.add_argument("--gamma", type=float, nargs="+", default=[PAPER_GAMMA],
                   help="affinity weights (default the paper's 1)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reuse-teacher", action="store_true", help="take the teacher and the "
                   "translator already trained under --runs, if there are, as they are")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    configs.add_flags(p)
    args = p.parse_args(argv)
    if "every" in args.rows:
        args.rows = [r for r in args.rows if r != "every"] + [
            r for r in METHOD_ROWS if r not in args.rows]
    out = args.out
    args.out, args.resume, args.stop_after = args.runs or out, False, None
    run = make_run(args)

    weights = (f"beta = {', '.join(f'{b:g}' for b in args.beta)}, "
               f"gamma = {', '.join(f'{g:g}' for g in args.gamma)}")
    if args.merge:
        results = merge_results(args.merge)
        args.seeds = sorted({r["seed"] for r in results["rows"] if r["method"] != "teacher"})
    else:
        print(f"ablation on {args.dataset}: {', '.join(args.rows)}; seeds {args.seeds}; "
              f"{run.config.distill_steps} student steps; {weights}; output in {out}/",
              flush=True)
        results = run_ablation(run, out, args.rows, args.seeds, args.beta, args.gamma,
                               figure=not args.no_figure, reuse=args.reuse_teacher)
    command = "python -m examples.segmentation.ablation " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    ending = footer(results["seconds"])
    table = format_table(results["summary"])
    print(f"{table}\n\n{ending}")
    scales = format_scales(results["rows"])
    if scales:
        print(f"\nweighted loss terms (mean over seeds):\n{scales}")
        scales = f"\nWeighted loss terms, mean over seeds:\n\n{scales}\n"
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(
        f"{table}\n\nCommand: `{command.strip()}`  \nMachine: {ending}  \n"
        f"{weights}, {run.config.distill_steps} student steps, seeds {args.seeds}\n{scales}")
    if "figure" in results:
        print(f"figure: {results['figure']}")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
