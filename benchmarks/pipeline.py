"""Throughput and peak memory of every step of the reference pipeline, on synthetic batches.

Random weights and random images at the datasets' sizes, the paper's networks
(DeepLabV3-ResNet50 at output stride 8, MobileNetV2 at output stride 16; or
with ``--networks digits`` the digit scenes' pair, a smoke test). One
row per stage's step, each in fp32 and under autocast (``--amp``):

- teacher step (stage ``teacher``): forward, cross-entropy, backward, SGD;
- teacher forward (no gradients; what ``evaluate`` runs, and the first part of
  the translator and distillation steps);
- student step (stage ``student``) and student forward (``evaluate``);
- translator step (stage ``translator``): the frozen teacher, then the
  autoencoder's forward, eq. (1), backward, SGD;
- distillation step (stage ``distill``, the paper's method): the step of
  ``segdistill.DistillationWrapper``, cross-entropy included, and its parts
  timed separately on the same inputs: teacher forward, translator encoder,
  student (forward, cross-entropy, backward with the adapters' gradient),
  adapters (forward and backward) and losses (adaptation and affinity,
  forward and backward).

The translator and distillation rows are measured for each reading of the
teacher's layer (``--teacher-layer``, the pipeline's flag of the same name):
``head``, the last feature map before the classifier (``classifier.3``, 256
channels), and ``backbone`` (``backbone.layer4``, 2048 channels). The last
lines give the distillation step over the teacher forward plus the student
step, per reading and precision: what the paper's method costs over training
the student alone plus the teacher forward that any distillation needs. The
three are timed in turn, round after round, and the median of the rounds'
ratios is given, so that a shared machine's changing load cancels out.

Prints Markdown tables (and writes them to ``--markdown``); examples/README.md
quotes them to say how long each stage takes.

    python benchmarks/pipeline.py --device cuda                      # 513 x 513 VOC batches
    python benchmarks/pipeline.py --device cuda --size 1024 2048 --batch 2   # Cityscapes
    python benchmarks/pipeline.py --device cpu --size 129 129 --batch 2 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`

from examples.segmentation import models  # noqa: E402
from examples.segmentation.config import TeacherLayer  # noqa: E402
from examples.segmentation.profiling import cpu_model  # noqa: E402
from segdistill import (  # noqa: E402
    DistillationOutput,
    DistillationTerm,
    DistillationWrapper,
    FeatureHooks,
    Translator,
    presets,
    reconstruction_loss,
)
from segdistill.hooks import probe_features  # noqa: E402

NETWORKS = {"paper": ("deeplabv3_resnet50", "mobilenet_v2", 3, 21),
            "digits": ("digits_os4", "digits_os8", 1, 11)}
"""Teacher, student, image channels and classes: the paper's, or the digit scenes' (for a
smoke test in seconds)."""


def _measure(step: Callable[[], object], steps: int, device: torch.device) -> tuple[float, float]:
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


def _conv_backward_flop(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int],
                        *args: object, **kwargs: object) -> int:
    """FLOPs of a convolution's backward pass: its forward's for each of the input's and
    the weight's gradient. torch's own formula leaves the groups out of the backward pass
    and counts a depthwise convolution's (MobileNetV2's) tens of times over."""
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, bool(transposed))
    return forward * sum(bool(m) for m in output_mask[:2])  # type: ignore[index]


def _alternate(steps: dict[str, Callable[[], object]], rounds: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step in ``rounds`` rounds that run every step once in turn (after
    one warm-up each), so that all of them see the same load on a shared machine."""
    def timed(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in steps.values():
        timed(step)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step))
    return seconds


def _sgd(params: object) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)  # type: ignore[arg-type]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                loss: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(value)
        optimizer.step()
    return step


def _logits(out: object) -> Tensor:
    return out["out"] if isinstance(out, dict) else out  # type: ignore[return-value]


def layer_label(reading: str, layer: str, channels: int) -> str:
    """How the ratio lines name a reading of the teacher's layer."""
    return f"teacher layer `{reading}` ({layer}, {channels} channels)"


class Bench:
    """The networks, one synthetic batch, and the table rows measured on them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.t_name, self.s_name, channels, classes = NETWORKS[args.networks]
        args.classes = args.classes or classes
        self.x = torch.randn(args.batch, channels, *args.size, device=self.device)
        self.y = torch.randint(0, args.classes, (args.batch, *args.size), device=self.device)
        self.teacher = models.TEACHERS[self.t_name].build(args.classes, False).to(self.device)
        self.student = models.STUDENTS[self.s_name].build(args.classes, False).to(self.device)
        self.amp_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        self.rows: list[str] = []
        self.gflop: dict[str, float] = {}
        self.ratios: list[str] = []

    def precisions(self) -> list[bool]:
        if self.args.amp == "none" or (self.args.amp == "fp16" and self.device.type == "cpu"):
            return [False]
        return [False, True]

    def label(self, amp: bool) -> str:
        return self.args.amp if amp else "fp32"

    def time(self, step: Callable[[], object], amp: bool) -> tuple[float, float, float]:
        """Seconds per step, peak GPU memory (GB) and GFLOP per step (one more step, under
        ``torch.utils.flop_counter``: matmuls and convolutions, forward and backward)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
            seconds, peak = _measure(step, self.args.steps, self.device)
            with FlopCounterMode(display=False, custom_mapping={
                    torch.ops.aten.convolution_backward: _conv_backward_flop}) as counter:
                step()
        return seconds, peak, counter.get_total_flops() / 1e9

    def row(self, stage: str, step: str, layer: str, amp: bool, seconds: float,
            peak: float, gflop: float) -> None:
        text = (f"| {stage} | {step} | {layer} | {self.label(amp)} | "
                f"{self.args.batch / seconds:.1f} | {1000 * seconds:,.0f} | {gflop:,.1f} | "
                f"{peak:.1f} |")
        print(text, flush=True)
        self.rows.append(text)

    # ---- the steps without a teacher layer -----------------------------------------------

    def plain_steps(self) -> None:
        """Teacher and student steps and forwards."""
        x, y, teacher, student = self.x, self.y, self.teacher, self.student
        teacher_step = _train_step(teacher, _sgd(teacher.parameters()),
                                   lambda: F.cross_entropy(_logits(teacher(x)), y))
        student_step = _train_step(student, _sgd(student.parameters()),
                                   lambda: F.cross_entropy(student(x), y))

        def forward(model: nn.Module) -> Callable[[], None]:
            def step() -> None:
                with torch.no_grad():
                    model(x)
            return step

        for name, stage, model, step in (
                ("teacher step", "teacher", teacher, teacher_step),
                ("teacher forward", "evaluate", teacher, forward(teacher)),
                ("student step", "student", student, student_step),
                ("student forward", "evaluate", student, forward(student))):
            model.train("step" in name)
            for amp in self.precisions():
                s, peak, gflop = self.time(step, amp)
                self.row(stage, name, "", amp, s, peak, gflop)
                self.gflop[name] = gflop
        teacher.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        self.free()

    # ---- the steps that read the teacher's layer ------------------------------------------

    def teacher_layer(self, reading: TeacherLayer) -> tuple[str, int]:
        """The module path and channels of the teacher's feature map that ``reading`` names
        (the pipeline's ``--teacher-layer``), its channels checked on one image of the
        batch (a forward pass without gradients, in eval mode).

        Raises:
            ValueError: if the map there has other channels than the architecture says.
        """
        spec = models.TEACHERS[self.t_name].layer(reading)
        probed = probe_features(self.teacher, {"t": spec}, self.x[:1], "teacher")["t"]
        assert probed.channels is not None  # probe_features raised on a mismatch
        return spec.layer, probed.channels

    def layer_steps(self, reading: TeacherLayer) -> None:
        """The translator and distillation steps at one reading of the teacher's layer, and
        the distillation step's parts."""
        layer, channels = self.teacher_layer(reading)
        s_arch = models.STUDENTS[self.s_name]
        x, y, teacher = self.x, self.y, self.teacher
        translator = Translator(channels, self.args.translator_channels).to(self.device)
        hooks = FeatureHooks(teacher, {"t": layer})

        def teacher_features() -> Tensor:
            with torch.no_grad():
                teacher(x)
            return hooks.pop()["t"]

        def reconstruction() -> Tensor:
            t = teacher_features()
            out = translator(t)
            return reconstruction_loss(t, out.reconstruction, out.latent)

        teacher.eval().requires_grad_(False)
        translator.train()
        translator_step = _train_step(translator, _sgd(translator.parameters()), reconstruction)
        for amp in self.precisions():
            s, peak, gflop = self.time(translator_step, amp)
            self.row("translator", "translator step", reading, amp, s, peak, gflop)
        hooks.remove()

        wrapper = presets.knowledge_adaptation(
            teacher, self.student, teacher_layer=layer,
            student_layer=s_arch.features,
            translator=translator).to(self.device)
        wrapper.train()
        optimizer = _sgd(wrapper.trainable_parameters())

        def distill_loss() -> Tensor:
            out: DistillationOutput = wrapper(x, target=y)
            return F.cross_entropy(out.output, y) + out.loss

        distill_step = _train_step(wrapper, optimizer, distill_loss)
        for amp in self.precisions():
            seconds, peak, gflop = self.time(distill_step, amp)
            self.row("distill", "distillation step (paper)", reading, amp, seconds, peak,
                     gflop)
            self.ratio(distill_step, reading, layer, channels, amp, gflop)
        optimizer.zero_grad(set_to_none=True)
        wrapper.remove_hooks()
        for amp in self.precisions():
            self.parts(wrapper, layer, reading, amp)
            self.free()

    def ratio(self, distill_step: Callable[[], None], reading: str, layer: str, channels: int,
              amp: bool, gflop: float) -> None:
        """The distillation step over the teacher forward plus the student step, the three
        timed in turn (:func:`_alternate`): the median of the rounds' ratios."""
        x, y, teacher, student = self.x, self.y, self.teacher, self.student

        def teacher_forward() -> None:
            with torch.no_grad():
                teacher(x)

        student_step = _train_step(student, _sgd(student.parameters()),
                                   lambda: F.cross_entropy(student(x), y))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
            s = _alternate({"t": teacher_forward, "s": student_step, "d": distill_step},
                           self.args.rounds, self.device)
        student.zero_grad(set_to_none=True)
        ratios = sorted(d / (t + st) for t, st, d in zip(s["t"], s["s"], s["d"], strict=True))
        median = statistics.median
        self.ratios.append(
            f"- {layer_label(reading, layer, channels)}, {self.label(amp)}: "
            f"distillation step / (teacher forward + student step) = "
            f"{median(ratios):.2f} (median of {len(ratios)} rounds that time the three in "
            f"turn; {1000 * median(s['d']):,.0f} ms / ({1000 * median(s['t']):,.0f} ms + "
            f"{1000 * median(s['s']):,.0f} ms); range {ratios[0]:.2f} to {ratios[-1]:.2f}); "
            f"in FLOPs {gflop / (self.gflop['teacher forward'] + self.gflop['student step']):.2f}")
        print(self.ratios[-1], flush=True)

    def parts(self, wrapper: DistillationWrapper, layer: str, reading: str, amp: bool) -> None:
        """The distillation step's parts, each on inputs made once (detached from the
        others), with the gradients the other parts would send it."""
        x, y, student = self.x, self.y, self.student
        # nn.ModuleDict holds plain modules: the preset's terms are DistillationTerms
        adaptation = cast(DistillationTerm, wrapper.terms["adaptation"])
        affinity = cast(DistillationTerm, wrapper.terms["affinity"])
        encoder = adaptation.teacher_transform
        assert encoder is not None and adaptation.student_adapter is not None
        assert affinity.student_adapter is not None
        adapters = (adaptation.student_adapter, affinity.student_adapter)
        t_hooks = FeatureHooks(self.teacher, {"t": layer})
        s_hooks = FeatureHooks(student, {"s": models.STUDENTS[self.s_name].features})
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp), \
                torch.no_grad():
            self.teacher(x)
            t = t_hooks.pop()["t"]
            code: Tensor = encoder(t)
            student(x)
            s = s_hooks.pop()["s"]
            adapted: list[Tensor] = [a(s) for a in adapters]
        grad_s = torch.randn_like(s) * 1e-3
        grad_adapted = [torch.randn_like(a) * 1e-3 for a in adapted]

        def teacher_forward() -> None:
            with torch.no_grad():
                self.teacher(x)
            t_hooks.pop()

        def translator_encoder() -> None:
            with torch.no_grad():
                encoder(t)

        def student_part() -> None:
            loss = F.cross_entropy(student(x), y) + (s_hooks.pop()["s"] * grad_s).sum()
            torch.autograd.backward(loss)
            student.zero_grad(set_to_none=True)

        def adapters_part() -> None:
            leaf = s.detach().requires_grad_()
            summed = sum((a(leaf) * g).sum() for a, g in zip(adapters, grad_adapted, strict=True))
            assert isinstance(summed, Tensor)  # not sum()'s 0 of no terms: there are two
            torch.autograd.backward(summed)
            for a in adapters:
                a.zero_grad(set_to_none=True)

        def losses_part() -> None:
            f, g = (a.detach().requires_grad_() for a in adapted)
            loss: Tensor = adaptation.weight * adaptation.loss(f, code) + \
                affinity.weight * affinity.loss(g, code)
            torch.autograd.backward(loss)

        total = total_gflop = 0.0
        for name, step in (("teacher forward", teacher_forward),
                           ("translator encoder", translator_encoder),
                           ("student (forward, backward)", student_part),
                           ("adapters (forward, backward)", adapters_part),
                           ("losses (forward, backward)", losses_part)):
            seconds, peak, gflop = self.time(step, amp)
            total += seconds
            total_gflop += gflop
            self.row("distill, part", name, reading, amp, seconds, peak, gflop)
        self.row("distill, part", "sum of the parts (no SGD update)", reading, amp, total,
                 float("nan"), total_gflop)
        t_hooks.remove()
        s_hooks.remove()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after a warm-up")
    parser.add_argument("--classes", type=int, default=None,
                        help="classes (default: the networks', 21 for the paper's)")
    parser.add_argument("--networks", choices=sorted(NETWORKS), default="paper",
                        help="the paper's (default), or the digit scenes' small pair")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the alternating timing behind the ratio (default 5)")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"),
                        help="the autocast rows' precision (none: fp32 rows only)")
    parser.add_argument("--teacher-layer", nargs="+", default=list(get_args(TeacherLayer)),
                        choices=get_args(TeacherLayer),
                        help="the readings of the teacher's layer to measure (default: all)")
    parser.add_argument("--translator-channels", type=int, default=None,
                        help="the translator's code channels (default: the teacher layer's)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    device = bench.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_model()}, {torch.get_num_threads()} torch threads")
    command = shlex.join(["python", *sys.argv] if argv is None else
                         ["python", "benchmarks/pipeline.py", *argv])
    head = (f"{name}; torch {torch.__version__}; batch {args.batch} of {args.size[0]} x "
            f"{args.size[1]}, {args.classes} classes, random weights; command: `{command}`")
    print(f"{head}\n")
    table = ["| stage | step | teacher layer | precision | images/s | ms/step | GFLOP/step "
             "| peak GPU memory (GB) |", "|---|---|---|---|---:|---:|---:|---:|"]
    print("\n".join(table), flush=True)
    bench.plain_steps()
    for reading in args.teacher_layer:
        bench.layer_steps(reading)
        bench.free()  # the reading's translator, adapters and optimiser state
    print("\n" + "\n".join(bench.ratios))
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([head, "", *table, *bench.rows, "", *bench.ratios]) + "\n")


if __name__ == "__main__":
    main()
