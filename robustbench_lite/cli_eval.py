"""``robustbench-lite eval``: how robust is *my* model?

    robustbench-lite eval --model small-cnn --weights model.safetensors --data fashion-mnist \\
        --threats linf:0.1 [--attacks standard] [--eps-curve linf:0:0.2:11]

Everything the user gives is read and checked before any attack runs (weights against the
architecture, images against the model, labels against its classes, eps against [0, 1] pixel
space); a problem exits with code 2 and one line that names the fix.  Then the user's model runs
through the harness like a trained one: its rows go into the store under the weights' hash (a
rerun resumes), the leaderboard CSVs and the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .core.device import AUTOCAST_CHOICES, make_policy
from .core.userdata import MAX_CLASSES
from .core.usermodel import parse_normalize
from .harness.attack_sets import SETS

_DANGER = ("allow a checkpoint that needs unpickling (a whole pickled nn.Module). Dangerous: unpickling runs any "
           "code the file names, so a file from an untrusted source can take over this machine")


def add_model_options(e: argparse.ArgumentParser, data_default: str = "") -> None:
    """The options that name a user's model and its data (``eval`` and ``replay`` share them);
    ``data_default`` says what a missing ``--data`` means (empty: it is required)."""
    e.add_argument("--model", help="architecture: a registry name (small-cnn), timm:NAME, or my_net.py:build, a function "
                   "build(input_shape, num_classes) -> nn.Module; omit it for a whole pickled module (--trust-pickle)")
    e.add_argument("--weights", help=".safetensors, or a .pt/.pth state dict (read with weights_only)")
    e.add_argument("--data", help="a registered dataset (robustbench-lite list datasets), a folder of "
                   "class sub-folders of PNG/JPEG images, or an .npz with x (uint8, or floats in [0, 1]) and y"
                   + (f"; default: {data_default}" if data_default else ""))
    e.add_argument("--normalize", help="MEAN,STD (or per channel m1,m2,m3,s1,s2,s3) for pixels in [0, 1]: the "
                   "normalization the model was trained with; it goes inside the model, eps stays in pixel space")
    e.add_argument("--num-classes", help="the model's number of classes (default: the data's)")
    e.add_argument("--channels", help="convert the images to 1 (grey) or 3 (RGB) channels to match the model")
    e.add_argument("--trust-pickle", action="store_true", help=_DANGER)
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--data-root", help="where registered datasets' files are")
    e.add_argument("--plugin", action="append", default=argparse.SUPPRESS, metavar="FILE.py")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate your own model (a weights file) on a dataset, an image folder or an .npz")
    add_model_options(e)
    e.add_argument("--access", default="gradients", help="what the model gives an attacker: gradients (default), "
                   "scores (its outputs, no gradients) or labels (only the predicted class, like an API that returns "
                   "labels); attacks that need more are skipped with a note, e.g. --access labels --attacks hsj")
    e.add_argument("--threats", help="comma-separated NORM:EPS, eps for pixels in [0, 1]: linf:0.1,linf:8/255,l2:1.5")
    e.add_argument("--attacks", default="standard", help=f"a set ({' | '.join(SETS)}; default standard) or "
                   "comma-separated attack names")
    e.add_argument("--n", default="1000", help="test points (the first n; default 1000)")
    e.add_argument("--eps-curve", help="robust accuracy over NORM:START:STOP:COUNT evenly spaced eps (comma-separate "
                   "several), e.g. linf:0:0.2:11; eps 0 is the clean accuracy")
    e.add_argument("--curve-order", help="with --eps-curve: up (default): attack each eps on the points not broken yet (every "
                   "robust point is attacked at its eps); down: AttackBench's search from the largest eps, stopping at "
                   "a point's first failure (cheaper; assumes failing in a ball means failing in smaller ones)")
    e.add_argument("--autocast", default="auto", choices=AUTOCAST_CHOICES)
    e.add_argument("--batch-size", default="500", help="evaluation batch size, or 'auto'")
    e.add_argument("--workdir", default=".rbl", help="store and model cache folder (default .rbl)")
    e.add_argument("--out", default="leaderboards", help="folder for the leaderboard CSVs")
    e.add_argument("--report", default="report", help="folder for report.html and report.md (default report)")
    e.add_argument("--save-adv", metavar="DIR", help="write each attack's adversarial examples (the points it broke) "
                   "to DIR as safetensors, for `robustbench-lite replay`")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) nor progress lines "
                   "(elsewhere, one per finished attack)")


def _int(text: str | None, flag: str, low: int, high: int | None = None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} takes a whole number, got {text!r}") from None
    if value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{flag} must be <= {high:,}, got {value}")
    return value


def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` command; bad input exits 2 with one line naming the fix."""
    try:
        plan, info = _plan(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"robustbench-lite: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    return _execute(args, plan, info)


def load_model(args: argparse.Namespace, data: str | None = None):
    """The data and the model the options of :func:`add_model_options` name, read and checked
    (``data`` replaces ``--data``): ``(data_spec, data, model_spec, weights_spec, model, classes)``."""
    from .harness.user import check_on_data, prepare, resolve_data

    source = data if data is not None else args.data
    if not args.weights or not source:
        raise ValueError(f"{args.command} needs --weights FILE and --data DATASET|FOLDER|FILE.npz (and --model ARCH for a "
                         "state dict)")
    num_classes = _int(args.num_classes, "--num-classes", 2, MAX_CLASSES)
    channels = _int(args.channels, "--channels", 1)
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels takes 1 (grey) or 3 (RGB), got {channels}")
    data_spec, loaded = resolve_data(source, data_root=args.data_root, channels=channels, num_classes=num_classes)
    normalize = parse_normalize(args.normalize, loaded.input_shape[0]) if args.normalize else None
    model_spec, weights_spec, model = prepare(loaded, arch=args.model, weights=args.weights, normalize=normalize,
                                              num_classes=num_classes, trust_pickle=args.trust_pickle,
                                              access=getattr(args, "access", "gradients"))
    return data_spec, loaded, model_spec, weights_spec, model, check_on_data(model, loaded)


def _plan(args: argparse.Namespace):
    from .harness.plan import Plan
    from .harness.user import parse_curve, parse_threat, user_cells

    if not args.weights or not args.data:
        raise ValueError("eval needs --weights FILE and --data DATASET|FOLDER|FILE.npz (and --model ARCH for a state dict)")
    threats = [parse_threat(t) for t in (args.threats or "").split(",") if t.strip()]
    curves = [parse_curve(c) for c in (args.eps_curve or "").split(",") if c.strip()]
    if not threats and not curves:
        raise ValueError("give --threats NORM:EPS (e.g. linf:0.1 or linf:8/255) and/or --eps-curve linf:0:0.2:11")
    n = _int(args.n, "--n", 1)
    if args.curve_order is not None and args.curve_order not in ("up", "down"):
        raise ValueError(f"--curve-order takes up or down, got {args.curve_order!r}")
    if args.curve_order is not None and not curves:
        raise ValueError(f"--curve-order {args.curve_order} orders the eps of a curve, and there is none: add --eps-curve "
                         "NORM:START:STOP:COUNT (e.g. linf:0:0.2:11), or drop --curve-order")
    batch = args.batch_size.strip().lower()
    info_batch: int | str = "auto" if batch == "auto" else _int(batch, "--batch-size", 1)
    make_policy(args.device, args.autocast)  # a bad device fails here
    data_spec, data, model_spec, weights_spec, model, k = load_model(args)
    n_eval = min(n, len(data.test))
    cells = user_cells(data_spec, model_spec, weights_spec, threats=threats, attacks=args.attacks, n=n_eval,
                       num_classes=k, curves=curves, curve_order=args.curve_order or "up")
    info = {"n": n_eval, "asked": n, "model": model_spec.name, "weights": weights_spec.name, "data": data_spec.name,
            "batch_size": info_batch}
    return Plan("eval", tuple(cells)), info


def _execute(args: argparse.Namespace, plan, info: dict) -> int:
    from .harness.identity import distinguish
    from .harness.rows import SKIPPED, WORST_CASE, model_identity
    from .harness.run import run_plan
    from .harness.store import Store
    from .report import leaderboard

    if info["n"] < info["asked"]:
        print(f"note: the data has {info['n']} points; evaluating all of them")
    start = time.perf_counter()
    summary = run_plan(plan, workdir=args.workdir, device=args.device, batch_size=info["batch_size"],
                       progress=not args.no_progress, autocast=args.autocast, data_root=args.data_root,
                       plugins=getattr(args, "plugin", []), save_adv=args.save_adv)
    elapsed = time.perf_counter() - start
    with Store(f"{args.workdir}/store.sqlite") as store:
        rows = store.rows()
    keys = {c.key for c in plan.cells}
    model_id = model_identity(plan.cells[0])["model_id"]  # this model, not another of the same names
    mine = [r for r in distinguish(rows) if r.model_key and (r.key in keys or r.attack == WORST_CASE)
            and r.model_id == model_id]
    print(f"{info['model']} / {info['weights']} on {info['data']} ({info['n']} points): {summary.computed} cells "
          f"computed, {summary.skipped} already done, {summary.errors} errors, {elapsed:.1f} s")
    for line in _summary_lines(mine):
        print("  " + line)
    for r in sorted((r for r in mine if r.status == SKIPPED), key=lambda r: (r.kind, r.norm, r.eps, r.attack)):
        print(f"  skipped {r.attack} ({r.kind} {r.norm} {r.eps:g}): {r.error}")
    paths = leaderboard.write(rows, args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.save_adv:
        print(f"adversarial examples: {Path(args.save_adv).resolve()} (check them: robustbench-lite replay)")
    try:
        from .report.html import write_report

        html_path, _ = write_report(rows, args.report)
        print(f"report: {html_path.resolve()}")
    except ImportError:  # matplotlib is an optional extra
        print("report: skipped (pip install matplotlib for report.html)")
    return 1 if summary.errors else 0


def _summary_lines(rows) -> list[str]:
    from .harness.kinds import kind
    from .harness.rows import WORST_CASE

    ordered = sorted(rows, key=lambda r: (r.kind, r.norm, r.eps, r.attack != WORST_CASE, r.attack))
    return [line for r in ordered if (line := kind(r.kind).summary_line(r))]
