"""What capturing costs: a distillation step with the wrapper's hooks against the same
step written by hand, for a layer that is written in place later in its block (copied
at capture every step) and one that is not (handed out as it is after the first step).

The pair is torchvision's ResNet-18 twice (random init), FitNet on a layer of
``layer2``; the hand-written step runs the teacher without gradients, the student,
the same FitNet loss on hand-picked features and the backward. Times are medians of
``--repeats`` steps after one warm-up, measured in one process (compare the ratios)::

    python benchmarks/capture.py --threads 1 --markdown docs/benchmarks/capture_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segdistill import FeatureSpec, presets
from segdistill.losses import FitNetLoss

LAYERS = {"layer2.1.bn2": "written in place later (out += identity, ReLU(inplace))",
          "layer2": "not written after capture"}


def _pair() -> tuple[nn.Module, nn.Module]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=8).eval(), resnet18(num_classes=8).eval()


def _median_seconds(step: Callable[[], Any], repeats: int) -> float:
    step()  # warm-up (and the wrapper's first step, which copies every capture)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _by_hand(layer: str, x: Tensor) -> Callable[[], Any]:
    """The same step without the wrapper: features picked by hooks that copy them."""
    teacher, student = _pair()
    loss = FitNetLoss(128, 128)
    picked: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        return lambda module, args, out: picked.__setitem__(name, out.clone())

    teacher.get_submodule(layer).register_forward_hook(keep("t"))
    student.get_submodule(layer).register_forward_hook(keep("s"))

    def step() -> None:
        with torch.no_grad():
            teacher(x)
        out = student(x)
        (out.mean() + loss(picked["s"], picked["t"])).backward()

    return step


def _wrapped(layer: str, x: Tensor) -> Callable[[], Any]:
    teacher, student = _pair()
    spec = FeatureSpec(layer, channels=128)
    wrapper = presets.fitnet(teacher, student, teacher_layer=spec, student_layer=spec)
    wrapper.eval()

    def step() -> None:
        out = wrapper(x)
        (out.output.mean() + out.loss).backward()

    return step


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    x = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for layer, why in LAYERS.items():
        by_hand = _median_seconds(_by_hand(layer, x), args.repeats)
        wrapped = _median_seconds(_wrapped(layer, copy.deepcopy(x)), args.repeats)
        rows.append({"layer": layer, "why": why, "by_hand": by_hand, "wrapper": wrapped,
                     "ratio": wrapped / by_hand})
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [f"Capture cost: ResNet-18 -> ResNet-18, FitNet, batch {args.batch} of "
             f"{args.size} x {args.size}, {torch.get_num_threads()} thread(s), "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"median of {args.repeats} steps.", "",
             "| layer | after capture | by hand (copies) s | wrapper s | wrapper / by hand |",
             "|---|---|---|---|---|"]
    lines += [f"| `{r['layer']}` | {r['why']} | {r['by_hand']:.4f} | {r['wrapper']:.4f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", metavar="PATH", help="also write the table there")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = table(run(args), args)
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            shown = sys.argv[1:] if argv is None else list(argv)
            f.write("\n".join(lines) + "\n\nCommand: `python benchmarks/capture.py "
                    + " ".join(shown) + "`\n")


if __name__ == "__main__":
    main()
