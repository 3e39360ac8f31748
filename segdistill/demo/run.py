"""The demo: the paper's pipeline and ablation at small scale, on a CPU, in minutes.

``python -m segdistill.demo`` trains a teacher, a student baseline, the
translator and a distilled student on digit scenes, prints a table and writes
a figure; the distilled student uses the paper's method with the adaptation
weight rescaled to these networks (``DEMO_BETA``). ``python -m segdistill.demo
--ablation`` runs every method of the paper's Tables 1 and 3 over three seeds at
the paper's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from segdistill.demo import models
from segdistill.demo.data import NUM_CLASSES, DigitScenes, make_digit_scenes
from segdistill.metrics import ConfusionMatrix
from segdistill.profiling import count_flops, count_parameters
from segdistill.training import TrainConfig, fit
from segdistill.translator import Translator
from segdistill.translator_training import train_translator
from segdistill.wrapper import DistillationWrapper

__all__ = ["METHODS", "DemoConfig", "main", "run"]


PAPER_BETA, PAPER_GAMMA = 50.0, 1.0
"""The paper's stage-2 weights of the adaptation and the affinity term."""

DEMO_BETA = 0.5
"""The demo's adaptation weight. At the paper's 50 the adaptation term is about 200
times the cross-entropy on these small networks and the student gets worse; at 0.5
it is of the order of the cross-entropy (see docs/ablation.rst, which measures both)."""


@dataclass
class DemoConfig:
    """Sizes and schedules of a demo run; the defaults are the short run."""

    train_scenes: int = 2000
    val_scenes: int = 500
    size: int = 48
    batch_size: int = 32
    teacher_steps: int = 1000
    student_steps: int = 1000
    translator_steps: int = 300
    lr: float = 0.05
    weight_decay: float = 4e-5
    adaptation_weights: Sequence[float] = (DEMO_BETA,)
    affinity_weights: Sequence[float] = (PAPER_GAMMA,)
    methods: Sequence[str] = ("student", "adaptation+affinity")
    seeds: Sequence[int] = (0,)
    out_dir: str = "demo_out"
    progress: bool = True
    figure: bool = True
    log: list[dict[str, Any]] = field(default_factory=list, repr=False)


def train_segmenter(model: nn.Module, data: DigitScenes, steps: int, config: DemoConfig,
                    seed: int) -> list[dict[str, float]]:
    """Train a segmenter or a :class:`DistillationWrapper` with :func:`segdistill.training.fit`:
    SGD with momentum, the poly schedule, cross-entropy plus the wrapper's terms."""
    train_config = TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr,
                               weight_decay=config.weight_decay, seed=seed,
                               progress=config.progress)
    return fit(model, TensorDataset(data.images, data.labels), train_config)


@torch.no_grad()
def evaluate(model: nn.Module, data: DigitScenes, batch_size: int = 100) -> ConfusionMatrix:
    """Val confusion matrix of a plain segmenter."""
    model.eval()
    cm = ConfusionMatrix(NUM_CLASSES, ignore_index=None)
    for start in range(0, len(data.images), batch_size):
        x = data.images[start:start + batch_size]
        cm.update(model(x).argmax(1), data.labels[start:start + batch_size])
    return cm


def _variants(method: str, config: DemoConfig) -> list[tuple[str, float, float]]:
    """(row label, beta, gamma) for each weight setting ``method`` runs with.

    The paper's terms run once per weight given for them (``adaptation`` per beta,
    ``affinity`` per gamma, both per pair); the label names the weights where
    more than one was given. Other methods run once, with no weights.
    """
    betas, gammas = tuple(config.adaptation_weights), tuple(config.affinity_weights)
    grids = {"adaptation": [(b, 0.0) for b in betas], "affinity": [(0.0, g) for g in gammas],
             "adaptation+affinity": [(b, g) for b in betas for g in gammas]}
    if method not in grids:
        return [(method, 0.0, 0.0)]
    out = []
    for beta, gamma in grids[method]:
        parts = ([f"beta={beta:g}"] if "adaptation" in method and len(betas) > 1 else []) + (
            [f"gamma={gamma:g}"] if "affinity" in method and len(gammas) > 1 else [])
        out.append((f"{method} ({', '.join(parts)})" if parts else method, beta, gamma))
    return out


def _make_wrapper(method: str, teacher: nn.Module, student: nn.Module,
                  translator: Translator, beta: float = 0.0,
                  gamma: float = 0.0) -> DistillationWrapper | None:
    """The wrapper for one ablation method, built as a user would build it; ``beta``
    and ``gamma`` weigh the paper's terms where ``method`` uses them."""
    if method == "student":
        return None
    if method.startswith("kd_T"):
        return DistillationWrapper.kd(teacher, student, temperature=float(method[4:]),
                                      ignore_index=None)
    if method == "fitnet":
        return DistillationWrapper.fitnet(
            teacher, student, teacher_layer=models.TEACHER_FEATURES,
            student_layer=models.STUDENT_FEATURES, student_channels=48, teacher_channels=64,
        )
    if method not in ("adaptation", "affinity", "adaptation+affinity"):
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer=models.TEACHER_FEATURES,
        student_layer=models.STUDENT_FEATURES, translator=translator, student_channels=48,
        adaptation_weight=beta if "adaptation" in method else 0.0,
        affinity_weight=gamma if "affinity" in method else 0.0,
    )


METHODS: tuple[str, ...] = (
    "student", "kd_T2", "kd_T4", "kd_T6", "fitnet",
    "affinity", "adaptation", "adaptation+affinity",
)
"""Every ablation method, as in the paper's Tables 1 and 3 (the teacher is reported too)."""


def run(config: DemoConfig) -> dict[str, Any]:
    """Train and evaluate everything ``config`` asks for; return the results."""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = make_digit_scenes("train", config.train_scenes, size=config.size, seed=0)
    val = make_digit_scenes("val", config.val_scenes, size=config.size, seed=0)
    example = val.images[:1]

    torch.manual_seed(0)
    teacher = models.teacher()
    train_segmenter(teacher, train, config.teacher_steps, config, seed=10_000)
    teacher.eval()
    results: dict[str, Any] = {"config": {k: v for k, v in asdict(config).items() if k != "log"},
                               "machine": _machine(), "rows": []}
    teacher_cm = evaluate(teacher, val)
    results["rows"].append(_row("teacher", 0, teacher_cm, teacher, example))

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(train.images), batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(20_000), drop_last=True)
    stage1 = train_translator(teacher, loader, models.TEACHER_FEATURES,
                              epochs=math.ceil(config.translator_steps / len(loader)),
                              max_steps=config.translator_steps, progress=config.progress)
    results["translator_loss"] = {"first": stage1.history[0], "last": stage1.history[-1]}

    trained: dict[tuple[str, int], nn.Module] = {}
    for seed in config.seeds:
        for method, label, beta, gamma in ((m, *v) for m in config.methods
                                           for v in _variants(m, config)):
            torch.manual_seed(seed)
            student = models.student()
            wrapper = _make_wrapper(method, teacher, student, stage1.translator, beta, gamma)
            history = train_segmenter(wrapper or student, train, config.student_steps, config,
                                      seed=seed)
            if wrapper is not None:
                wrapper.remove_hooks()
            cm = evaluate(student, val)
            row = _row(label, seed, cm, student, example)
            row["weights"] = {"beta": beta, "gamma": gamma}
            row["terms_start"], row["terms_end"] = loss_scales(history)
            results["rows"].append(row)
            trained[(label, seed)] = student
    results["seconds"] = time.perf_counter() - t0
    results["summary"] = summarize(results["rows"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if config.figure:
        from segdistill.demo.figure import save_figure

        first = config.seeds[0]
        students = {m: model for (m, seed), model in trained.items() if seed == first}
        results["figure"] = str(save_figure(out_dir / "demo.png", val, teacher, students,
                                            stage1.translator))
    return results


def _row(method: str, seed: int, cm: ConfusionMatrix, model: nn.Module,
         example: Tensor) -> dict[str, Any]:
    return {"method": method, "seed": seed, "miou": cm.miou(),
            "iou": [float(v) for v in cm.iou()], "params": count_parameters(model),
            "flops": count_flops(model, example)}


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
    training, averaged over seeds, one line per distilled method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if set(row.get("terms_start", {})) - {"loss", "ce"}:  # a distillation term was logged
            by_method.setdefault(row["method"], []).append(row)
    if not by_method:
        return ""
    lines = ["| method | term | first 50 steps | last 50 steps |", "|---|---|---:|---:|"]
    for method, group in by_method.items():
        for key in group[0]["terms_start"]:
            start = sum(r["terms_start"][key] for r in group) / len(group)
            end = sum(r["terms_end"][key] for r in group) / len(group)
            lines.append(f"| {method} | {key} | {start:.4g} | {end:.4g} |")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation of mIoU per method, in order of appearance."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in by_method.items():
        values = [r["miou"] for r in group]
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if len(values) > 1 else float("nan"))
        summary.append({"method": method, "runs": len(values), "miou_mean": mean,
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


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``python -m segdistill.demo``."""
    parser = argparse.ArgumentParser(prog="python -m segdistill.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", action="store_true",
                        help="every method of the paper's Tables 1 and 3, three seeds, at the "
                        "paper's weights (beta 50, gamma 1) unless --beta/--gamma are given")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0, or "
                        "0 1 2 with --ablation)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to train")
    parser.add_argument("--steps", type=int, help="student steps (default 1000)")
    parser.add_argument("--teacher-steps", type=int, help="teacher steps (default 1000)")
    parser.add_argument("--translator-steps", type=int, help="translator steps (default 300)")
    parser.add_argument("--train-scenes", type=int, help="training scenes (default 2000)")
    parser.add_argument("--val-scenes", type=int, help="validation scenes (default 500)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 32)")
    parser.add_argument("--beta", type=float, nargs="+",
                        help="adaptation weight (default 0.5; 50 with --ablation, the "
                        "paper's); several values "
                        "run the adaptation methods once per value")
    parser.add_argument("--gamma", type=float, nargs="+",
                        help="affinity weight (default 1, the paper's); several values "
                        "run the affinity methods once per value")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    config = DemoConfig(out_dir=args.out, figure=not args.no_figure,
                        progress=not args.no_progress and sys.stderr.isatty())
    if args.ablation:  # the paper's tables, at the paper's weights unless told otherwise
        config.methods, config.seeds = METHODS, (0, 1, 2)
        config.adaptation_weights, config.affinity_weights = (PAPER_BETA,), (PAPER_GAMMA,)
    overrides: dict[str, Callable[[Any], None]] = {
        "seeds": lambda v: setattr(config, "seeds", tuple(v)),
        "methods": lambda v: setattr(config, "methods", tuple(v)),
        "steps": lambda v: setattr(config, "student_steps", v),
        "teacher_steps": lambda v: setattr(config, "teacher_steps", v),
        "translator_steps": lambda v: setattr(config, "translator_steps", v),
        "train_scenes": lambda v: setattr(config, "train_scenes", v),
        "val_scenes": lambda v: setattr(config, "val_scenes", v),
        "batch_size": lambda v: setattr(config, "batch_size", v),
        "beta": lambda v: setattr(config, "adaptation_weights", tuple(v)),
        "gamma": lambda v: setattr(config, "affinity_weights", tuple(v)),
    }
    for name, apply in overrides.items():
        value = getattr(args, name)
        if value is not None:
            apply(value)

    weights = (f"beta = {', '.join(f'{b:g}' for b in config.adaptation_weights)}, "
               f"gamma = {', '.join(f'{g:g}' for g in config.affinity_weights)}")
    print(f"segdistill demo: {', '.join(config.methods)}; seeds {list(config.seeds)}; "
          f"{config.student_steps} student steps; {weights}; output in {config.out_dir}/",
          flush=True)
    results = run(config)
    m = results["machine"]
    command = "python -m segdistill.demo " + " ".join(argv if argv is not None else sys.argv[1:])
    footer = (f"{results['seconds']:.0f} s on {m['cpu']} ({m['threads']} threads), "
              f"torch {m['torch']}, Python {m['python']}")
    table = format_table(results["summary"])
    print(table)
    print(f"\n{footer}")
    scales = format_scales(results["rows"])
    if scales:
        print(f"\nweighted loss terms (mean over seeds):\n{scales}")
        scales = f"\nWeighted loss terms, mean over seeds:\n\n{scales}\n"
    (Path(config.out_dir) / "summary.md").write_text(
        f"{table}\n\nCommand: `{command.strip()}`  \nMachine: {footer}  \n"
        f"{weights}, {config.student_steps} student steps, seeds {list(config.seeds)}\n{scales}"
    )
    if "figure" in results:
        print(f"figure: {results['figure']}")
    print(f"results: {Path(config.out_dir) / 'results.json'}")
    return 0
