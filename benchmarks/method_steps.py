"""What each pipeline method costs: one training step of every method beside the plain
student's step, its time and its peak memory.

Every method of the pipeline (``examples.segmentation.methods.METHODS``, and the
combinations of CIRKD's scripts, ``COMBINATIONS``) is built as the pipeline builds it,
through ``methods.distillation_wrapper`` on a :class:`~examples.segmentation.run.Run`
whose ``OUT/teacher/model.pt`` and ``OUT/translator/model.pt`` hold random weights
written into a temporary folder first. One step is what ``fit`` does per batch: the
wrapper's forward pass (the teacher's, without gradients, and the student's), the
task's cross-entropy plus the distillation loss, the backward pass, and the step of
the pipeline's optimiser (``training.make_optimizer`` on the config's settings: SGD with
momentum and weight decay in both settings below, the trainable parameters only), with
the discriminator's Adam step beside it where a term trains one
(``training.make_adversary``). Left out: the data loader, the host-side
finiteness checks and the logging of ``fit``. The plain student's step is the same
without a teacher: the student's forward, the cross-entropy, backward, SGD.

Time: the median of ``--repeats`` steps after ``--warmup`` steps. A method's steps are
timed in pairs with the plain student's (one student step, then one method step), and
its ratio is the median of the pairs' ratios, so that a change in the machine's load
hits both sides of a ratio alike: on a shared machine compare the ratios.

Memory: the peak of the bytes held by tensors during one step (after the warm-up, so
the optimiser's momentum buffers exist): what is resident when the step starts (every
parameter and buffer of the wrapper, the teacher's, the translator's and the losses'
included, the optimisers' state and the batch, each storage counted once) plus the
step's peak rise over it. The rise is ``torch.cuda.max_memory_allocated`` over
``torch.cuda.memory_allocated`` on CUDA; on the CPU the running sum of the allocations
and frees that ``torch.profiler`` records (``profile_memory=True``) from PyTorch's CPU
allocator, so it is the tensors' bytes, not the process's resident set (allocator
caching and libraries' own buffers are not in it). Extra memory is a method's peak
over the plain student's.

A method that runs out of memory is shown as "did not fit". For the relational terms
(the affinity loss of ``knowledge_adaptation``, ``pairwise``, CIRKD's mini-batch
term), whose reference form builds N x N maps (B^2 of them for CIRKD), the last
column gives the memory that dense form would need at the grid the term sees
(``benchmarks/methods.py``'s estimates, the shapes recorded at the warm-up); the
library's forms, which the rows measure, are memory-linear.

Sizes: ``--size digits`` (the default): the digit scenes' config, its batch (32) of
48 x 48, teacher ``digits_os4``, student ``digits_os8``, 11 classes. ``--size
cityscapes``: CIRKD's Cityscapes setup per GPU (``--recipe
cirkd-cityscapes-r101-r18``): batch 2 of its 512 x 1024 crops, DeepLabV3-ResNet101 teacher,
DeepLabV3-ResNet18 student, 19 classes; random weights. ``--batch`` and ``--image``
change the batch and the image size of either. float32 throughout.

Run from the repository root:

    python benchmarks/method_steps.py --threads 1 --markdown docs/benchmarks/method_steps_cpu.md
    python benchmarks/method_steps.py --device cuda --size cityscapes --markdown t.md
    python benchmarks/method_steps.py --methods kd cirkd --repeats 1 --batch 4   # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`
sys.path.append(str(REPO / "benchmarks"))  # for the loss benchmarks' helpers and estimates

import affinity  # noqa: E402
import methods as loss_benchmark  # noqa: E402
from affinity import MB  # noqa: E402

from examples.segmentation import methods as pipeline  # noqa: E402
from examples.segmentation.config import (  # noqa: E402
    CONFIGS,
    PipelineConfig,
    crop_size,
    recipe_config,
)
from examples.segmentation.data import IGNORE_INDEX  # noqa: E402
from examples.segmentation.run import (  # noqa: E402
    Run,
    build_student,
    build_teacher,
    new_translator,
    train_config,
)
from examples.segmentation.training import (  # noqa: E402
    make_adversary,
    make_optimizer,
    step_loss,
)
from segdistill import DistillationWrapper, save_checkpoint  # noqa: E402

STUDENT = "student (no teacher)"
"""The plain student's row."""

DENSE_FORMS = {"AffinityLoss": "affinity_loss", "PairwiseLoss": "pairwise_loss",
               "CIRKDLoss": "cirkd_loss"}
"""The term losses with an N x N reference form, by class name, and their rows in
``benchmarks/methods.py`` (whose ``dense_bytes`` estimate that form's need)."""


@dataclass(frozen=True)
class Size:
    """A table's setting: the pipeline config and the batch (the images are its crops)."""

    title: str
    config: Callable[[], PipelineConfig]
    batch: int
    channels: int
    """The images' channels (the digit scenes are grey)."""

    @property
    def image(self) -> tuple[int, int]:
        """The config's training crop, (height, width)."""
        return crop_size(self.config().crop)


SIZES = {
    "digits": Size("the digit scenes", lambda: CONFIGS["digits"],
                   CONFIGS["digits"].batch_size, 1),
    # CIRKD's per-GPU batch: 16 over 8 GPUs; the recipe's crops, 512 x 1024
    "cityscapes": Size("Cityscapes, CIRKD's setup per GPU",
                       lambda: recipe_config("cirkd-cityscapes-r101-r18").override(
                           pretrained=False), 2, 3),
}


def default_methods() -> list[str]:
    """The pipeline's methods, then the combinations of CIRKD's scripts."""
    return [*pipeline.METHODS, *pipeline.COMBINATIONS]


# ---------------------------------------------------------------- one step


@dataclass
class Setup:
    """One row's model, its step, and what it holds when a step starts."""

    model: nn.Module
    step: Callable[[], None]
    resident_bytes: int = 0
    dense: list[str] = field(default_factory=list)
    """The dense forms' estimated needs, one cell text per relational term."""


def _batch(run: Run, size: Size, batch: int, image: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Random images and labels (a tenth of the pixels ignored) on the run's device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, size.channels, *image, generator=generator)
    labels = torch.randint(0, run.config.num_classes, (batch, *image), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = IGNORE_INDEX
    return images.to(run.device), labels.to(run.device)


def make_step(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], images: Tensor,
              labels: Tensor) -> Callable[[], None]:
    """One training step of ``model`` (a wrapper, or a plain segmenter) on one batch, as the
    pipeline runs it: its loss (:func:`~examples.segmentation.training.step_loss`, the
    cross-entropy plus the distillation terms), backward, and a step of every optimiser."""
    distilling = isinstance(model, DistillationWrapper)

    def step() -> None:
        _, loss = step_loss(model, distilling, images, labels, IGNORE_INDEX)
        loss.backward()  # type: ignore[no-untyped-call]
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

    return step


def resident_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                   *tensors: Tensor) -> int:
    """The bytes of the storages of ``model``'s parameters and buffers, the optimisers'
    state and ``tensors``, each storage once (gradients are cleared between steps)."""
    state = [v for o in optimizers for s in o.state.values() for v in s.values()
             if isinstance(v, Tensor)]
    storages: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers(), *state, *tensors):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@contextlib.contextmanager
def dense_shapes(model: nn.Module) -> Iterator[dict[str, tuple[str, torch.Size]]]:
    """Record, while in the block, the teacher-side map that each relational term's loss
    takes (its second argument): ``{term: (benchmarks/methods.py row, shape)}``."""
    found: dict[str, tuple[str, torch.Size]] = {}
    handles = []
    terms = model.terms.items() if isinstance(model, DistillationWrapper) else ()
    for name, term in terms:
        loss = term.loss
        key = DENSE_FORMS.get(type(loss).__name__)
        if key is None or not isinstance(loss, nn.Module):
            continue

        def record(module: nn.Module, args: tuple[Any, ...], name: str = name,
                   key: str = key) -> None:
            found[name] = (key, args[1].shape)

        handles.append(loss.register_forward_pre_hook(record))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _megabytes(n: float) -> str:
    return "< 1 MB" if n < MB else f"~{n / MB:,.0f} MB"


def dense_estimates(found: dict[str, tuple[str, torch.Size]], device: str) -> list[str]:
    """Each relational term's dense form's estimated need, as cell text."""
    cells = []
    for name, (key, shape) in found.items():
        b, c, h, w = shape
        case = loss_benchmark.Case(b, c, h, w, key, "dense", device, 1, 1)
        estimate = loss_benchmark.METHODS[key].dense_bytes
        assert estimate is not None  # every DENSE_FORMS row has one
        need = estimate(case)
        cells.append(f"{name}: {_megabytes(need)} at {b} x {h} x {w}")
    return cells


def build(run: Run, size: Size, method: str, batch: int, image: tuple[int, int]) -> Setup:
    """The step of one row (``method``, or :data:`STUDENT`), as the pipeline builds its
    model and optimisers."""
    images, labels = _batch(run, size, batch, image)
    if method == STUDENT:
        model: nn.Module = build_student(run)
        optimizers: list[torch.optim.Optimizer] = [
            make_optimizer(model, train_config(run, "student", 1), run.device)[0]]
    else:
        model = pipeline.distillation_wrapper(run, method).to(run.device)
        optimizers = [make_optimizer(model, train_config(run, f"distill-{method}", 1),
                                     run.device)[0]]
        adversary = make_adversary(model)
        optimizers += [adversary] if adversary is not None else []
    model.train()
    setup = Setup(model, make_step(model, optimizers, images, labels))
    setup.resident_bytes = resident_bytes(model, optimizers, images, labels)
    return setup


def write_random_weights(run: Run, need_translator: bool) -> None:
    """Random (seeded) weights where the pipeline's stages would have written trained ones:
    ``OUT/teacher/model.pt`` and, for the methods that need one, ``OUT/translator/model.pt``."""
    teacher = build_teacher(run, trained=False)
    save_checkpoint({"model": teacher.state_dict()}, run.out / "teacher" / "model.pt")
    if need_translator:
        save_checkpoint({"model": new_translator(run).state_dict()},
                        run.out / "translator" / "model.pt")
    del teacher


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step, the device's queue drained."""
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def peak_rise_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The peak rise of the bytes held by tensors during one step, over those held when it
    starts: ``max_memory_allocated`` on CUDA, the profiler's record of the CPU allocator's
    allocations and frees elsewhere."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device)) - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    assert prof.profiler is not None and prof.profiler.kineto_results is not None
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _warm(setup: Setup, warmup: int, device: torch.device) -> None:
    """The warm-up steps; the first records the relational terms' grids (kept for the
    row even where a step runs out of memory)."""
    with dense_shapes(setup.model) as found:
        try:
            for _ in range(max(warmup, 1)):
                setup.step()
            _sync(device)
        finally:
            setup.dense = dense_estimates(found, device.type)


def measure(setup: Setup, student: Setup | None, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """Warm up, measure the peak memory of one step, then time ``--repeats`` steps (in
    pairs with ``student``'s where given, and then the ratio to it): seconds, peak
    bytes."""
    _warm(setup, args.warmup, device)
    result: dict[str, Any] = {"status": "ok", "dense": setup.dense,
                              "resident_bytes": setup.resident_bytes}
    result["peak_bytes"] = setup.resident_bytes + peak_rise_bytes(setup.step, device)
    if student is None:
        times = [timed(setup.step, device) for _ in range(args.repeats)]
        result["seconds"] = statistics.median(times)
        return result
    pairs = [(timed(student.step, device), timed(setup.step, device))
             for _ in range(args.repeats)]
    result.update(seconds=statistics.median(m for _, m in pairs),
                  student_seconds=statistics.median(s for s, _ in pairs),
                  ratio=statistics.median(m / s for s, m in pairs))
    return result


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def measure_row(run: Run, size: Size, method: str, student: Setup | None,
                args: argparse.Namespace) -> tuple[dict[str, Any], Setup | None]:
    """One row's result, and its setup (kept for the plain student's row only). An error
    is the row's status: "did not fit" for one out of memory, else "failed"."""
    setup = None
    try:
        setup = build(run, size, method, args.batch, args.image)
        result = measure(setup, student, args, run.device)
    except Exception as error:  # the row's status; the other rows still run
        # the first clause of the message: what failed, without the advice after it
        first = (str(error).strip().splitlines() or [""])[0].split("; ")[0]
        status = "did not fit" if _out_of_memory(error) else \
            f"failed ({type(error).__name__}: {first[:160]})"
        result = {"status": status, "dense": setup.dense if setup is not None else []}
        if _out_of_memory(error) and run.device.type == "cuda":
            total = torch.cuda.get_device_properties(run.device).total_memory
            result["status"] += f" ({total / MB:,.0f} MB on the device)"
    keep = None
    if method == STUDENT and result["status"] == "ok":
        keep, result["ratio"] = setup, 1.0
    del setup
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    return result, keep


# ---------------------------------------------------------------- the table


TABLE_HEAD = ("| method | step (s) | step / student step | peak memory (MB) "
              "| extra over the student (MB) | resident at the step's start (MB) "
              "| a dense reference form would need (estimate) |\n"
              "|---|---:|---:|---:|---:|---:|---|")


def table_row(method: str, result: dict[str, Any], student: dict[str, Any] | None) -> str:
    """One Markdown row; extra memory is over ``student``'s peak."""
    dense = "; ".join(result.get("dense", [])) or ""
    if result["status"] != "ok":
        return f"| {method} | {result['status']} |  |  |  |  | {dense} |"
    extra = ratio = ""
    if student is not None and student["status"] == "ok":
        extra = f"{(result['peak_bytes'] - student['peak_bytes']) / MB:,.1f}"
    if "ratio" in result:  # none where the student's row failed
        ratio = f"{result['ratio']:.2f}"
    return (f"| {method} | {result['seconds']:.4f} | {ratio} | "
            f"{result['peak_bytes'] / MB:,.1f} | {extra} | "
            f"{result['resident_bytes'] / MB:,.1f} | {dense} |")


def title(args: argparse.Namespace, config: PipelineConfig) -> str:
    size: Size = SIZES[args.size]
    h, w = args.image
    return (f"One training step of each pipeline method, {size.title}: batch {args.batch} "
            f"of {h} x {w}, teacher {config.teacher}, student {config.student}, "
            f"{config.num_classes} classes, teacher layer '{config.teacher_layer}', random "
            f"weights, float32, on {args.device}; median of {args.repeats} steps after "
            f"{args.warmup} warm-up step(s), each method's timed in pairs with the plain "
            "student's (its ratio the median of the pairs')\n")


def foot(args: argparse.Namespace, load: float | None) -> list[str]:
    """The machine and the command; the load average at the start (``load``) and now;
    ``--note``. Each a paragraph."""
    lines = ["", affinity.header(args.device)]
    if load is not None:
        lines += ["", f"Load average (1 min) {load:.2f} at the start, "
                      f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} cores."]
    if args.note:
        lines += ["", args.note]
    return lines


def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every row, print it, and rewrite ``--json`` and ``--markdown`` (the foot
    included) after each; the raw results and the lines."""
    size = SIZES[args.size]
    config = size.config()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [title(args, config), TABLE_HEAD]
    print("\n".join(lines), flush=True)
    raw: list[dict[str, Any]] = []

    def emit(method: str, result: dict[str, Any], student: dict[str, Any] | None) -> None:
        raw.append({"method": method, **result})
        lines.append(table_row(method, result, student))
        print(lines[-1], flush=True)
        affinity.write_outputs(args, raw, [*lines, *foot(args, load)])

    with tempfile.TemporaryDirectory(prefix="method-steps-") as out:
        run = Run(config, None, Path(out), torch.device(args.device), progress=False)
        write_random_weights(run, any(pipeline.needs_translator(m) for m in args.methods))
        student, student_setup = measure_row(run, size, STUDENT, None, args)
        emit(STUDENT, student, None)
        for method in args.methods:
            emit(method, measure_row(run, size, method, student_setup, args)[0], student)
    end = foot(args, load)
    print("\n".join(end), flush=True)
    lines += end
    affinity.write_outputs(args, raw, lines)
    return raw, lines


def _method(name: str) -> str:
    try:
        pipeline.check_method(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument("--size", choices=list(SIZES), default="digits",
                        help="the setting: the digit scenes (default) or CIRKD's Cityscapes "
                        "setup per GPU")
    parser.add_argument("--batch", type=int, help="the batch (default: the setting's)")
    parser.add_argument("--image", type=int, nargs=2, metavar=("H", "W"),
                        help="the images' size (default: the setting's)")
    parser.add_argument("--methods", nargs="+", type=_method, metavar="METHOD",
                        help="these pipeline methods (a+b combinations too); default: "
                        + " ".join(default_methods()))
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (default 2; at least 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch's CPU threads (default: torch's own); one is steadier on "
                        "a machine that others share")
    parser.add_argument("--note", help="a line for the table's foot (who else used the "
                        "machine, say)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the table here, with the command and the machine")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.batch = args.batch or size.batch
    args.image = tuple(args.image or size.image)
    args.methods = args.methods or default_methods()
    if args.repeats < 1 or args.batch < 1:
        parser.error(f"--repeats and --batch must be at least 1, got {args.repeats} and "
                     f"{args.batch}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_all(args)


if __name__ == "__main__":
    main()
