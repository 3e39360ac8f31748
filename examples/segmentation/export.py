"""The export stage: a trained student to TorchScript, ``torch.export`` and ONNX.

Each format is written, loaded back from its file and run on two inputs (a
batch of two val images, and one random image of another size: batch, height
and width are dynamic), and its output is compared with the eager model's;
the largest absolute difference of each is printed and written to
``export.json``. None of the files needs this code to load: TorchScript and
the exported program need torch only, ONNX an ONNX runtime::

    torch.jit.load("student.torchscript.pt")(images)
    torch.export.load("student.pt2").module()(images)
    onnxruntime.InferenceSession("student.onnx").run(None, {"image": images.numpy()})

``images`` are normalised as the pipeline normalises them (``sample.pt``
holds an input and the eager model's output for it). ONNX needs the
``export`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["FILES", "Format", "export_student", "format_export"]

Format = Literal["torchscript", "pt2", "onnx"]
"""The export formats: TorchScript (``torch.jit.script``), ``torch.export``'s
ExportedProgram, ONNX (``torch.onnx.export``)."""

FILES: dict[str, str] = {"torchscript": "student.torchscript.pt", "pt2": "student.pt2",
                         "onnx": "student.onnx"}
"""The file each format is written to, in the export folder."""

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


ROUNDING_FACTOR = 4.0
"""How many times the eager model's own float32 rounding error an export may differ by."""


def _tolerance(reference: Tensor) -> float:
    """The largest absolute difference accepted of a well-conditioned model: float32
    rounding over a few hundred layers, relative to the logits' scale."""
    return 1e-3 * max(1.0, float(reference.abs().max()))


def _float32_rounding(model: nn.Module, inputs: Sequence[Tensor],
                      references: Sequence[Tensor],
                      device: str | torch.device = "cpu") -> float:
    """The largest absolute difference of the eager model's float32 outputs from its
    float64 ones (computed on ``device``): how far float32 rounding alone moves them.

    A few training steps from random weights leave batch norms whose running
    statistics are far from the activations', and such a network amplifies rounding
    through its layers: its float32 logits can be 1 % off the exact ones, and
    another runtime's kernels (ONNX Runtime's) as far off again.
    """
    exact = copy.deepcopy(model).to(device=device, dtype=torch.float64)
    return max(float((ref.double() - exact(x.to(device, torch.float64)).cpu()).abs().max())
               for x, ref in zip(inputs, references, strict=True))


def _script(model: nn.Module, path: Path, example: Tensor) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    return loaded  # type: ignore[no-any-return]


def _exported(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    dynamic = torch.export.Dim.DYNAMIC  # batch, height and width
    return torch.export.export(model, (example,),
                               dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},))


def _pt2(model: nn.Module, path: Path, example: Tensor) -> Callable[[Tensor], Tensor]:
    torch.export.save(_exported(model, example), path)
    return torch.export.load(path).module()


def _onnx(model: nn.Module, path: Path, example: Tensor) -> Callable[[Tensor], Tensor]:
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(_exported(model, example), (example,), str(path),
                          input_names=["image"], output_names=["logits"],
                          external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    return run


WRITERS: dict[str, Callable[[nn.Module, Path, Tensor], Callable[[Tensor], Tensor]]] = {
    "torchscript": _script, "pt2": _pt2, "onnx": _onnx}

_TRACED = ("torch.export traces the network with a dynamic batch, height and width from "
           "the {h} x {w} images; a network whose sizes must divide by its stride (SegFormer: "
           "32) may fail at others: export from images of such a size")
HINTS = {"torchscript": "TorchScript compiles the Python source itself and refuses much of "
                        "what models use (Hugging Face models, SegFormer among them): leave "
                        "it out (--formats pt2 onnx)",
         "pt2": _TRACED, "onnx": _TRACED}
"""What to do when a format fails, by format (the export stage's error says it)."""


def _write(name: str, model: nn.Module, path: Path, images: Tensor) -> Callable[[Tensor], Tensor]:
    """``WRITERS[name]``, whose failure says which format and network failed and what to
    do (:data:`HINTS`), with the exporter's own error chained."""
    try:
        return WRITERS[name](model, path, images)
    except Exception as error:  # the exporters raise many kinds; each is re-raised as one
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        hint = HINTS[name].format(h=images.shape[2], w=images.shape[3])
        raise RuntimeError(f"the {name} export of {type(model).__name__} failed "
                           f"({type(error).__name__}: {first}). {hint}") from error


def check_formats(formats: Sequence[str]) -> None:
    """Fail now, before any work, on an unknown format or a missing ONNX package.

    Raises:
        ValueError: a format not in :data:`Format`.
        ModuleNotFoundError: ONNX asked for without onnx, onnxscript or onnxruntime.
    """
    unknown = [f for f in formats if f not in get_args(Format)]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; expected some of "
                         f"{list(get_args(Format))}")
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if "onnx" in formats and missing:
        raise ModuleNotFoundError(
            f"the ONNX export needs {', '.join(missing)}: pip install '.[export]' (onnx, "
            "onnxscript, onnxruntime), or leave onnx out (--formats torchscript pt2)")


@torch.no_grad()
def export_student(model: nn.Module, images: Tensor, folder: Path,
                   formats: Sequence[str] = get_args(Format), *,
                   reference_device: str | torch.device = "cpu") -> dict[str, Any]:
    """Write ``model`` in each format under ``folder``, load each back and check it
    against the eager model.

    The model is exported on the CPU in eval mode. Inputs: ``images`` (a batch
    of at least two; the export traces it), then one random image larger by 32
    rows and 64 columns, to check that batch and size stay dynamic.

    The tolerance is 1e-3 of the logits' largest magnitude (at least 1e-3); where
    an export differs by more, it becomes the larger of that and
    :data:`ROUNDING_FACTOR` times the eager model's own float32 rounding error (its
    distance from the float64 outputs, ``float32_rounding`` in the result): a
    briefly trained network can be ill-conditioned enough that float32 kernels of
    another runtime differ by as much as float32 and float64 do.

    Args:
        model: the plain student (a tensor of logits out).
        images: a batch (B >= 2, C, H, W) as the pipeline feeds it.
        folder: where to write the files, ``sample.pt`` and ``export.json``.
        formats: some of :data:`Format`.
        reference_device: where the float64 outputs run when the tolerance needs them (a
            GPU's float64 takes a second where a CPU's takes minutes at 1024 x 2048).

    Returns:
        ``{"formats": {format: {"file", "max_abs_diff", "tolerance"}}, "inputs": [...]}``,
        and ``"float32_rounding"`` where it was measured.

    Raises:
        ValueError: fewer than two images; an unknown format; a format whose
            output differs from the eager model's by more than the tolerance.
        RuntimeError: a format cannot write the network (the message names it and
            says what to do, :data:`HINTS`; the exporter's error is chained).
        ModuleNotFoundError: see :func:`check_formats`.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> result = export_student(net, torch.randn(2, 3, 8, 8), Path(tempfile.mkdtemp()),
        ...                         ["torchscript", "pt2"])
        >>> sorted(result["formats"]), result["formats"]["pt2"]["max_abs_diff"] < 1e-5
        (['pt2', 'torchscript'], True)
    """
    check_formats(formats)
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"expected a batch of at least 2 images (B, C, H, W) to export with "
                         f"a dynamic batch, got shape {tuple(images.shape)}")
    model = model.cpu().eval()
    images = images.cpu().float()
    c, h, w = images.shape[1:]
    generator = torch.Generator().manual_seed(0)
    inputs = [images, torch.randn(1, c, h + 32, w + 64, generator=generator)]
    references = [model(x) for x in inputs]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"input": inputs[0], "output": references[0]}, folder / "sample.pt")
    result: dict[str, Any] = {"inputs": [list(x.shape) for x in inputs], "formats": {}}
    tolerance = max(_tolerance(ref) for ref in references)
    rounding: float | None = None  # the eager model's own, measured when first needed
    for name in formats:
        path = folder / FILES[name]
        run = _write(name, model, path, images)
        diff = max(float((run(x) - ref).abs().max()) for x, ref in zip(inputs, references,
                                                                        strict=True))
        if not diff <= tolerance and rounding is None:
            rounding = _float32_rounding(model, inputs, references, reference_device)
            result["float32_rounding"] = rounding
            tolerance = max(tolerance, ROUNDING_FACTOR * rounding)
        result["formats"][name] = {"file": str(path), "max_abs_diff": diff,
                                   "tolerance": tolerance}
        if not diff <= tolerance:
            raise ValueError(
                f"the {name} export {path} differs from the eager model by {diff:.3g} "
                f"(tolerance {tolerance:.3g}: the larger of 1e-3 of the logits' scale and "
                f"{ROUNDING_FACTOR:g} times the eager model's own float32 rounding, "
                f"{rounding:.3g} from its float64 outputs)")
    (folder / "export.json").write_text(json.dumps(result, indent=2))
    return result


def format_export(name: str, result: dict[str, Any]) -> str:
    """One export as a Markdown table: format, file, largest difference from eager."""
    shapes = " and ".join(" x ".join(map(str, s)) for s in result["inputs"])
    lines = [f"## {name}: exported, checked against eager on inputs {shapes}", "",
             "| format | file | max abs difference from eager |", "|---|---|---:|"]
    for fmt, r in result["formats"].items():
        lines.append(f"| {fmt} | {r['file']} | {r['max_abs_diff']:.2e} |")
    if "float32_rounding" in result:
        lines += ["", f"The eager model's own float32 rounding (its largest difference from "
                  f"float64) is {result['float32_rounding']:.2e}: an ill-conditioned network, "
                  f"checked to {ROUNDING_FACTOR:g} times that."]
    return "\n".join(lines)
