"""Every method x every preset it supports on one model: the top-1 table of the papers.

    ouro-export compare --demo                         (embedded demo model, digits calib/test splits)
    ouro-export compare vim_s.pth --calib-dir C --eval-dir E   (ImageNet-style folders)
    python tools/compare_methods.py --demo [--methods ...] [--presets ...]

All methods see the same calibration images (drawn once, seeded) and the same evaluation images.
Each (method, preset) runs `ouro.calib.quant.calibrate` with the preset as shipped (no per-method
tuning here), then top-1 on the evaluation images. Output: a printed table shaped like the seeds'
tables (method, data, #images, W/A, top-1, delta vs FP; plus the SQNR of the logits vs FP, which
still separates methods when top-1 saturates on a small test set), and `<prefix>.json`, `<prefix>.md`,
`<prefix>.png` (top-1 vs activation bits, one line per method and weight width).

Under torchrun (`dist`), the (method, preset) cells are shared out over the processes (each cell is
computed exactly as one process computes it); rank 0 gathers the rows and writes the outputs.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .files import OutputError, WritePlan, atomic_write, check_creatable_folder, check_path_length
from .metrics import logits, sqnr_db, top1

__all__ = [
    "METHOD_ORDER",
    "COMPARE_PRESETS",
    "CompareRow",
    "CompareResult",
    "method_presets",
    "run_comparison",
    "format_table",
    "output_files",
    "output_plan",
    "write_outputs",
    "CompareConfig",
    "check_selection",
    "compare_main",
]

METHOD_ORDER = ("ouromamba", "ptq4vm", "qmamba", "percentile", "minmax")
"""Rows are grouped by method in this order (the papers' tables list the proposed method first)."""
COMPARE_PRESETS = ("w8a8", "w6a6", "w4a8", "w4a4", "w6a4")
"""Presets compared, in table order; a method runs those of them it ships (QMamba adds w6a4)."""
COMPARE_BATCH = 128


@dataclass
class CompareRow:
    method: str
    preset: str
    data: str
    images: int
    w_bits: int
    a_bits: int
    top1: float | None
    delta: float | None
    calib_seconds: float
    logit_sqnr_db: float | None = None
    method_info: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def wa(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


@dataclass
class CompareResult:
    model: str
    data: str
    calib_images: int
    eval_images: int
    fp_top1: float
    seed: int
    rows: list[CompareRow]
    total_seconds: float = 0.0
    torch_threads: int = 1
    cpu_count: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "wa": r.wa} for r in self.rows]
        return d


def method_presets(method: str, presets: tuple[str, ...] = COMPARE_PRESETS) -> list[str]:
    """The presets of `presets` that `method` ships, in `presets` order."""
    from ouro.recipes import list_presets

    have = set(list_presets(method))
    return [p for p in presets if p in have]


def _summarise_info(info: dict) -> dict:
    """Method info as stored in the JSON (QMamba's per-SSM LtSQ choices are counted, and kept)."""
    out = dict(info)
    abar = info.get("abar_quantizers")
    if abar:
        out["ltsq_selected"] = f"{sum(a['quantizer'] == 'ltsq' for a in abar)}/{len(abar)}"
    return out


def run_comparison(
    model,
    calib_images: Tensor,
    eval_images: Tensor,
    eval_labels: Tensor,
    *,
    data: str,
    methods: tuple[str, ...] = METHOD_ORDER,
    presets: tuple[str, ...] = COMPARE_PRESETS,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
    dist=None,
) -> CompareResult:
    """Calibrate and evaluate every (method, preset); a failing run is a row with its error.
    dist: under torchrun, this rank runs every world_size-th cell; every rank returns all rows."""
    from tqdm.auto import tqdm

    from ouro.calib.distributed import SINGLE

    dist = dist or SINGLE
    from ouro.calib.imagefolder import make_forward_loop
    from ouro.calib.quant import calibrate
    from ouro.recipes import get_preset

    t_all = time.perf_counter()
    model.eval()
    if len(eval_images) != len(eval_labels) or len(eval_images) == 0:
        raise ValueError(f"need a non-empty evaluation set with one label per image; got {len(eval_images)} images, {len(eval_labels)} labels")
    fp_logits = logits(model, eval_images, COMPARE_BATCH)
    fp = top1(fp_logits, eval_labels)
    runs = [(m, p) for m in methods for p in method_presets(m, presets)]
    if not runs:
        raise ValueError(f"no (method, preset) pair to run: methods {list(methods)}, presets {list(presets)}")
    loop = make_forward_loop(calib_images)
    mine = dist.shard(list(enumerate(runs)))
    done: list[tuple[int, CompareRow]] = []
    bar = tqdm([r for _, r in mine], desc="compare", unit="run", disable=not progress or not dist.is_main)
    for (k, _), (method, preset) in zip(mine, bar):
        bar.set_postfix_str(f"{method} {preset}")
        recipe = get_preset(preset, method)
        t0 = time.perf_counter()
        try:
            qmodel = calibrate(model, recipe, loop, seed=seed, progress=False)
            secs = time.perf_counter() - t0
            q_logits = logits(qmodel, eval_images, COMPARE_BATCH)
            acc = top1(q_logits, eval_labels)
            info = _summarise_info(qmodel.method_info)
            done.append((k, CompareRow(method, preset, data, int(calib_images.shape[0]), recipe.w_bits, recipe.a_bits,
                                       round(acc, 2), round(acc - fp, 2), round(secs, 1),
                                       round(sqnr_db(fp_logits, q_logits), 2), info)))
            del qmodel
        except Exception as e:  # one broken method must not hide the others' numbers
            done.append((k, CompareRow(method, preset, data, int(calib_images.shape[0]), recipe.w_bits, recipe.a_bits,
                                       None, None, round(time.perf_counter() - t0, 1),
                                       error=f"{type(e).__name__}: {e}".splitlines()[0][:300])))
            if os.environ.get("OURO_DEBUG"):
                traceback.print_exc()
    rows = [row for _, row in sorted((kr for part in dist.all_gather(done) for kr in part), key=lambda kr: kr[0])]
    return CompareResult(
        model=model_name or getattr(model.cfg, "name", "vim"), data=data,
        calib_images=int(calib_images.shape[0]), eval_images=int(eval_images.shape[0]), fp_top1=round(fp, 2),
        seed=seed, rows=rows, total_seconds=round(time.perf_counter() - t_all, 1),
        torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count() or 1,
    )


def format_table(res: CompareResult) -> str:
    """Markdown table: method, data, #images, W/A, top-1, delta vs FP (plus logit SQNR and calibration seconds)."""
    lines = [
        f"Model {res.model}; FP top-1 {res.fp_top1:.2f} % on {res.eval_images} evaluation images; "
        f"{res.calib_images} calibration images; seed {res.seed}; total {res.total_seconds:.0f} s "
        f"({res.torch_threads} torch threads, {res.cpu_count} CPUs).",
        "",
        "| method | data | #images | W/A | top-1 (%) | Δ vs FP | logit SQNR (dB) | calib (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| FP | – | – | 32/32 | {res.fp_top1:.2f} | – | – | – |",
    ]
    for r in res.rows:
        t1 = f"{r.top1:.2f}" if r.top1 is not None else f"error: {r.error}"
        d = f"{r.delta:+.2f}" if r.delta is not None else "–"
        sq = f"{r.logit_sqnr_db:.1f}" if r.logit_sqnr_db is not None else "–"
        lines.append(f"| {r.method} | {r.data} | {r.images} | {r.w_bits}/{r.a_bits} | {t1} | {d} | {sq} | {r.calib_seconds:.1f} |")
    return "\n".join(lines)


def _plot(res: CompareResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {4: "-", 6: "--", 8: ":"}
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in res.rows)]
    methods += sorted({r.method for r in res.rows} - set(methods))
    for mi, m in enumerate(methods):
        for wb in sorted({r.w_bits for r in res.rows if r.method == m}):
            pts = sorted((r.a_bits, r.top1) for r in res.rows if r.method == m and r.w_bits == wb and r.top1 is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(wb, "-."), marker="o",
                        color=colors[mi % len(colors)], label=f"{m} W{wb}")
    ax.axhline(res.fp_top1, color="black", lw=0.8, label=f"FP {res.fp_top1:.1f}")
    ax.set_xlabel("activation bits")
    ax.set_ylabel("top-1 (%)")
    ax.set_xticks(sorted({r.a_bits for r in res.rows}))
    ax.set_title(f"{res.model}: top-1 vs activation bits ({res.data}, {res.calib_images} calib images)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


OUTPUT_SUFFIXES = (".json", ".md", ".png")


def output_files(prefix: str | Path) -> tuple[Path, ...]:
    """The files of an output prefix: <prefix>.json, <prefix>.md, <prefix>.png."""
    prefix = Path(prefix)
    return tuple(prefix.with_name(prefix.name + ext) for ext in OUTPUT_SUFFIXES)


def output_plan(prefix: str | Path, *, force: bool = False) -> WritePlan:
    """The checked ouro.calib.files.WritePlan of an output prefix (existing files without force, a folder
    that is not writable, names too long: one-line OutputError, before any work). A missing folder of the
    prefix is created when the files are written, so it only has to be creatable."""
    plan = WritePlan(force=force)
    for f in output_files(prefix):
        plan.add("-o", f)
    try:
        folder = Path(prefix).parent
        if folder.is_dir():
            return plan.check()
        check_creatable_folder(folder, "-o folder")
        for f in plan.paths:
            check_path_length(f, "-o")
        return plan
    except OSError as e:  # a path the OS refuses to even look at
        raise OutputError(f"cannot use output path {str(e.filename)[:60]}...: {e.strerror}") from None


def write_outputs(res: CompareResult, prefix: str | Path, *, force: bool = True) -> list[Path]:
    """<prefix>.json, <prefix>.md, <prefix>.png, each written atomically (no-clobber unless `force`);
    returns the paths written."""
    pj, pm, pp = output_files(prefix)
    pj.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(pj, (json.dumps(res.to_dict(), indent=2) + "\n").encode(), force=force)
    atomic_write(pm, (format_table(res) + "\n").encode(), force=force)
    atomic_write(pp, lambda tmp: _plot(res, tmp), force=force)
    return [pj, pm, pp]


@dataclass(frozen=True)
class CompareConfig:
    """One `compare` run. demo: the embedded demo model's data (calibration and test splits);
    otherwise calib_dir and eval_dir (ImageNet-style class folders) are required. calib: the
    --calib spec text (None: see ouro.calib.imagefolder.parse_calib_spec). output: prefix of the
    .json/.md/.png files (checked by `check_outputs` before any work, written no-clobber unless force).
    model_name: the name in the table."""

    demo: bool = False
    calib: str | None = None
    calib_dir: Path | None = None
    eval_dir: Path | None = None
    seed: int = 0
    methods: tuple[str, ...] = METHOD_ORDER
    presets: tuple[str, ...] = COMPARE_PRESETS
    output: Path = Path("compare")
    model_name: str = "model"
    force: bool = False  # replace existing output files

    def __post_init__(self) -> None:
        from ouro.calib.imagefolder import ImageFolderError, parse_calib_spec

        check_selection(self.methods, self.presets)
        if not self.demo and not (self.calib_dir and self.eval_dir):
            raise ImageFolderError("compare on a checkpoint needs --calib-dir DIR (calibration images) and --eval-dir DIR "
                                   "(ImageNet-style class folders); or use --demo")
        parse_calib_spec(self.calib, None if self.calib_dir is None else str(self.calib_dir))  # a bad spec fails here

    def check_outputs(self) -> CompareConfig:
        """The output files can be written (ouro.calib.files.WritePlan), before any work; returns self."""
        output_plan(self.output, force=self.force)
        return self

    @staticmethod
    def names(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
        """`a, B,c` -> ("a", "b", "c"); empty or None -> default."""
        items = tuple(s.strip().lower() for s in (text or "").split(",") if s.strip())
        return items or default


def _data(model, cfg: CompareConfig, dist=None) -> tuple[Tensor, Tensor, Tensor, str]:
    """(calibration images, evaluation images, labels, data label) of a CompareConfig."""
    from ouro.calib.imagefolder import ImageFolderError, calibration_images, load_image_folder, parse_calib_spec

    calib_dir = None if cfg.calib_dir is None else str(cfg.calib_dir)
    spec = parse_calib_spec(cfg.calib, calib_dir)
    calib = calibration_images(model, spec, calib_dir=calib_dir, demo=cfg.demo, seed=cfg.seed, dist=dist)
    if cfg.eval_dir:
        x, y = load_image_folder(str(cfg.eval_dir), img_size=model.cfg.img_size, seed=cfg.seed)
        if y is None:
            raise ImageFolderError(f"--eval-dir {str(cfg.eval_dir)!r} has no class subfolders, so there are no labels to score top-1")
    else:
        from ouro.calib.data import load_digits_split

        x, y = load_digits_split("test", model.cfg.img_size)
    if spec.kind == "synthetic" or (calib_dir and (Path(calib_dir) / "images.npz").is_file()):
        label = "synthetic"
    else:
        label = "real"
    return calib, x, y, label


def check_selection(methods: tuple[str, ...], presets: tuple[str, ...]) -> None:
    """The methods x presets of a compare run, checked before any work: unknown names, or a selection
    in which no method ships any preset, are a one-line RecipeError."""
    from ouro.recipes import Method, RecipeError, list_presets

    unknown = [m for m in methods if m not in {x.value for x in Method}]
    if unknown:
        raise RecipeError(f"unknown method(s) {unknown}; known: {', '.join(x.value for x in Method)}")
    known = sorted({p for m in Method for p in list_presets(m)})
    unknown = [p for p in presets if p not in known]
    if unknown:
        raise RecipeError(f"unknown preset(s) {unknown} for --presets; known: {', '.join(known)}")
    if not any(method_presets(m, presets) for m in methods):
        raise RecipeError(f"no method of {list(methods)} ships any preset of {list(presets)}: nothing to compare")


def compare_main(model, cfg: CompareConfig, *, dist=None) -> int:
    """`ouro-export compare`: run, print the table, write <output>.json/.md/.png (rank 0 under
    torchrun). Returns the exit code."""
    from ouro.calib.distributed import SINGLE

    dist = dist or SINGLE
    calib, x, y, label = _data(model, cfg, dist)
    res = run_comparison(model, calib, x, y, data=label, methods=cfg.methods, presets=cfg.presets,
                         seed=cfg.seed, model_name=cfg.model_name, dist=dist)
    if dist.is_main:
        print(format_table(res))
        paths = write_outputs(res, cfg.output, force=cfg.force)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if all(r.error is None for r in res.rows) else 1
