"""Throughput and peak memory of the reference pipeline's steps, on synthetic batches.

Random weights and random images at the datasets' sizes: the teacher's forward
pass, a student training step, and a distillation step (the paper's method),
each with and without autocast. Prints a Markdown table; examples/README.md
quotes it to say how long each stage takes.

    python benchmarks/pipeline.py --device cuda                      # 513 x 513 VOC batches
    python benchmarks/pipeline.py --device cuda --size 1024 2048 --batch 2   # Cityscapes
    python benchmarks/pipeline.py --size 65 65 --batch 2 --steps 2   # a CPU smoke test
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`

from examples.segmentation import models  # noqa: E402
from segdistill import DistillationWrapper, Translator  # noqa: E402


def _measure(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step (after one warm-up) and peak memory in GB (CUDA only, else nan)."""
    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--translator-channels", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch, *args.size), device=device)
    teacher = models.teacher(args.classes, pretrained=False).to(device).eval()
    student = models.student("mobilenet_v2", args.classes, pretrained=False).to(device)
    layer, channels = models.STUDENT_LAYERS["mobilenet_v2"]
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer=models.TEACHER_LAYER, student_layer=layer,
        translator=Translator(models.TEACHER_CHANNELS, args.translator_channels).to(device),
        student_channels=channels).to(device)
    student_opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    wrapper_opt = torch.optim.SGD(wrapper.trainable_parameters(), lr=1e-3, momentum=0.9)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)

    def student_step() -> None:
        loss = F.cross_entropy(student(x), y)
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()

    def distill_step() -> None:
        out = wrapper(x, target=y)
        loss = F.cross_entropy(out.output, y) + out.loss
        wrapper_opt.zero_grad()
        loss.backward()
        wrapper_opt.step()

    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "CPU")
    print(f"# {name}; torch {torch.__version__}; batch {args.batch} of {args.size[0]} x "
          f"{args.size[1]}; command: python {' '.join(sys.argv)}\n")
    print("| step | precision | images/s | ms/step | peak GPU memory (GB) |")
    print("|---|---|---:|---:|---:|")
    for label, step in (("teacher forward", teacher_forward), ("student step", student_step),
                        ("distillation step (paper)", distill_step)):
        for amp in (False, True):
            if amp and args.amp == "fp16" and device.type == "cpu":
                continue
            wrapper.train()
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                seconds, peak = _measure(step, args.steps, device)
            print(f"| {label} | {args.amp if amp else 'fp32'} | {args.batch / seconds:.1f} | "
                  f"{1000 * seconds:.0f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
