"""``robustbench-lite run | list | leaderboard | report | eval | replay``.

Every failure ends in one line on stderr and an exit code that says what kind it was
(:data:`EXIT_CODES`); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .certify import VERIFIERS
from .cli_eval import add_eval_parser, run_eval
from .cli_replay import add_replay_parser, run_replay
from .core.device import AUTOCAST_CHOICES
from .core.progress import Progress, show_lines
from .core.registry import ATTACKS, DATASETS, DEFENSES, MODELS, PluginError, load_plugin_file
from .core.threat import ThreatModel
from .harness import faults
from .harness.kinds import KINDS
from .harness.presets import PRESETS, get_preset
from .harness.run import run_plan
from .harness.store import Store, StoreError
from .report import leaderboard

EXIT_OK = 0
EXIT_CELLS_FAILED = 1  # the run finished, but some cells raised (their rows say why)
EXIT_BAD_INPUT = 2  # a bad option, name or value (nothing was computed)
EXIT_PLUGIN = 3  # a --plugin file does not import or registers something that is not a plugin
EXIT_WORKDIR = 4  # the workdir, store or output folder cannot be used (damaged, read-only, a file in the way)
EXIT_INTERNAL = 70  # a bug: please report it with the output of -v
EXIT_INTERRUPTED = 130  # Ctrl-C: finished cells are stored; the same command resumes
EXIT_CODES = {
    EXIT_OK: "success", EXIT_CELLS_FAILED: "some cells failed", EXIT_BAD_INPUT: "bad input", EXIT_PLUGIN: "plugin error",
    EXIT_WORKDIR: "workdir or store problem", EXIT_INTERNAL: "internal error", EXIT_INTERRUPTED: "interrupted",
}


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be >= 1 (or 'auto'), got {value}")
    return value


_REGISTRIES = {
    "attacks": ATTACKS, "defenses": DEFENSES, "models": MODELS, "datasets": DATASETS, "verifiers": VERIFIERS,
    "kinds": KINDS,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustbench-lite", description="Adversarial robustness benchmark.")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="import a plugin file that registers attacks, defenses, models, datasets, verifiers or "
                   "cell kinds (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a preset and write the leaderboards")
    r.add_argument("--preset", default="quick", help=f"one of {sorted(PRESETS)} (default quick)")
    r.add_argument("--config", metavar="FILE.toml", help="a grid file (TOML) instead of a preset: copy one of "
                   "`robustbench-lite list presets` and edit it")
    r.add_argument("--attacks", type=_csv, help="comma-separated attack names replacing the preset's")
    r.add_argument("--defenses", type=_csv, help="comma-separated defense names replacing the preset's")
    r.add_argument("--datasets", type=_csv, help="comma-separated dataset names replacing the preset's")
    r.add_argument("--threats", type=_csv,
                   help="comma-separated NORM:EPS, e.g. linf:0.1,l2:1.5")
    r.add_argument("--n", type=_positive_int, help="number of test points")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (with --executor ray: where each task runs)")
    r.add_argument("--autocast", default="auto", choices=AUTOCAST_CHOICES,
                   help="mixed precision for training and attacks: auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16")
    r.add_argument("--autocast-eval", action="store_true",
                   help="also autocast evaluation (clean and adversarial predictions); off by default")
    r.add_argument("--data-root", help="where dataset files are (else RBL_DATA_ROOT or the default place)")
    r.add_argument("--workdir", default=".rbl", help="store and model cache folder (default .rbl)")
    r.add_argument("--out", default="leaderboards", help="folder for the leaderboard CSVs")
    r.add_argument("--batch-size", type=_batch_size, default=500,
                   help="evaluation batch size, or 'auto' to probe and cache the fastest per model, attack kind and device")
    r.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: one process (default); ray: one Ray task per (data, model, defense) group")
    r.add_argument("--address", help="with --executor ray: join this Ray cluster (e.g. 'auto' or HOST:6379); "
                   "default: start a local Ray instance")
    r.add_argument("--ray-cpus", type=_positive_int, default=2, help="CPUs of a local Ray instance (default 2)")
    r.add_argument("--save-adv", metavar="DIR", help="write each evasion attack's adversarial examples (the points "
                   "it broke) to DIR as safetensors, for `robustbench-lite replay`; cells finished before are not redone")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) nor progress lines "
                   "(elsewhere, one per finished attack)")
    r.add_argument("--trust-pickle", action="store_true", help="let the --config file's models with trust_pickle = true "
                   "unpickle their checkpoints (a grid file alone cannot). Dangerous: unpickling runs any code the file "
                   "names, so only for checkpoints from a source you trust")

    ls = sub.add_parser("list", help="list attacks, defenses, models, datasets, verifiers, kinds or presets")
    ls.add_argument("what", nargs="?", default="attacks", choices=[*_REGISTRIES, "presets"])
    ls.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'pgd*'")

    lb = sub.add_parser("leaderboard", help="rebuild the leaderboard CSVs from the store and print them (--format json: "
                        "leaderboard.json, RobustBench model_info-shaped, and a Markdown claim card per row)")
    lb.add_argument("--workdir", default=".rbl")
    lb.add_argument("--out", default="leaderboards")
    lb.add_argument("--format", default="csv", choices=["csv", "json"], help="csv: the CSVs, printed as tables (default); "
                    "json: OUT/leaderboard.json and OUT/claims/*.md, the JSON printed")

    add_eval_parser(sub)
    add_replay_parser(sub)

    mg = sub.add_parser("merge", help="copy the cells of other workdirs' stores into this workdir's store (a grid split "
                        "across machines or processes, each with its own workdir); then rebuild with `leaderboard`")
    mg.add_argument("stores", nargs="+", metavar="STORE", help="another workdir, or its store.sqlite")
    mg.add_argument("--workdir", default=".rbl")

    rp = sub.add_parser("report", help="write report.html (self-contained) and report.md from the store")
    rp.add_argument("--workdir", default=".rbl")
    rp.add_argument("--out", default="report", help="folder for report.html, report.md and plots/ (default report)")
    for q in (r, ls, lb, mg, rp):  # the global options also work after the subcommand
        q.add_argument("--plugin", action="append", default=argparse.SUPPRESS, metavar="FILE.py")
        q.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, and turn every failure into one line on stderr and an
    exit code from :data:`EXIT_CODES` (``-v``: with the traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    show_lines(not getattr(args, "no_progress", True))
    try:
        _check_folders(args)
        for path in args.plugin:
            load_plugin_file(path)
        if args.command == "list":
            return _list(args)
        if args.command == "leaderboard":
            if args.format == "json":
                return _leaderboard_json(args.workdir, args.out)
            return _leaderboard(args.workdir, args.out)
        if args.command == "merge":
            return _merge(args.workdir, args.stores)
        if args.command == "report":
            return _report(args.workdir, args.out)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "replay":
            return run_replay(args)
        return _run(args)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        return _fail(exc, args.verbose)


_FOLDERS = ("workdir", "out", "report")


def _check_folders(args: argparse.Namespace) -> None:
    """An empty folder option (``--workdir ''``) is refused before any work: it would mean the
    current folder, where nobody looks for a store."""
    for name in _FOLDERS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"--{name} is empty; give a folder, or leave the option out for its default")


def _fail(exc: BaseException, verbose: bool) -> int:
    """Print ``exc`` as one line (plus its traceback with ``verbose``); return its exit code."""
    if isinstance(exc, KeyboardInterrupt):
        code, msg = EXIT_INTERRUPTED, "interrupted; finished cells are stored, and the same command resumes the run"
    elif isinstance(exc, PluginError):
        code, msg = EXIT_PLUGIN, str(exc)
    elif isinstance(exc, (StoreError, sqlite3.Error)):
        code, msg = EXIT_WORKDIR, str(exc)
    elif isinstance(exc, FileNotFoundError) or isinstance(exc, (ValueError, TypeError, KeyError)):
        code = EXIT_BAD_INPUT
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fix = "" if "pick another" in str(exc.strerror) else "; check that --workdir and --out are writable folders"
        code, msg = EXIT_WORKDIR, f"{where}{exc.strerror or exc}{fix}"
    else:
        code = EXIT_INTERNAL
        msg = f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback, and please report it)"
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else type(exc).__name__
    print(f"robustbench-lite: error: {first}", file=sys.stderr)
    return code


def _list(args: argparse.Namespace) -> int:
    if args.what == "presets":
        for name in PRESETS:
            print(f"{name:10s} {PRESETS.path(name)}\n{'':10s} {PRESETS[name].description}")
        print("\nCopy one, edit it, and run it with: robustbench-lite run --config my.toml")
        return 0
    reg = _REGISTRIES[args.what]
    for name in reg.list(args.pattern):
        obj = reg.get(name)
        doc = (obj.__doc__ or "").strip().splitlines()
        norms = getattr(obj, "norms", None)
        extra = f" [{','.join(n.value for n in norms)}]" if isinstance(norms, tuple) else ""
        print(f"{name:16s}{extra} {doc[0] if doc else ''}")
    return 0


def _report(workdir: str, out: str) -> int:
    from .report.html import write_report  # matplotlib is needed only here

    with Store(f"{workdir}/store.sqlite", create=False) as store:
        rows = store.rows()
    html_path, md_path = write_report(rows, out)
    print(f"wrote {html_path} and {md_path}")
    return 0


def _leaderboard(workdir: str, out: str) -> int:
    with Store(f"{workdir}/store.sqlite", create=False) as store:
        rows = store.rows()
    if not rows:
        raise ValueError(f"the results store in {workdir} holds no cells yet: run `robustbench-lite run --workdir {workdir}` first")
    paths = leaderboard.write(rows, out)
    faults.point("leaderboard-written")
    print(leaderboard.render(rows))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _merge(workdir: str, stores: Sequence[str]) -> int:
    """A finished cell from another store replaces what this one holds; an error row is copied only
    where this store has nothing for its key (:meth:`Store.merge_from`)."""
    sources = [Path(s) / "store.sqlite" if Path(s).is_dir() else Path(s) for s in stores]
    target = (Path(workdir) / "store.sqlite").resolve()
    for src in sources:
        if not src.is_file():
            raise ValueError(f"no results store at {src}: pass another run's workdir or its store.sqlite")
        if src.resolve() == target:
            raise ValueError(f"{src} is this workdir's own store; pass the other runs' workdirs")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    with Store(target) as store:
        for src in sources:
            print(f"{src}: {store.merge_from(src)} rows copied")
    print(f"run `robustbench-lite leaderboard --workdir {workdir}` to rebuild the tables (trained models stay in "
          "each workdir's models/ folder)")
    return 0


def _leaderboard_json(workdir: str, out: str) -> int:
    from .report.export import write_json

    with Store(f"{workdir}/store.sqlite", create=False) as store:
        rows = store.rows()
        if not rows:
            raise ValueError(f"the results store in {workdir} holds no cells yet: run `robustbench-lite run --workdir {workdir}` first")

        def mask_of(key: str):
            hit = store.get(key)
            return None if hit is None else hit[1]

        doc, paths = write_json(rows, out, mask_of=mask_of)
    print(json.dumps(doc, indent=2))
    print("wrote " + ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else ""),
          file=sys.stderr)
    return 0


def _config(path: str, data_root: str | None, trust_pickle: bool = False):
    from .harness.gridfile import load_grid

    return load_grid(path, data_root=data_root, trust_pickle=trust_pickle)


def _check_out(out: str) -> None:
    """Fail before any work when the leaderboard folder cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, "a file is in the way of the leaderboard folder; pick another --out", str(path))
    path.mkdir(parents=True, exist_ok=True)


def _run(args: argparse.Namespace) -> int:
    threats = [ThreatModel.parse(t) for t in args.threats] if args.threats is not None else None
    preset = _config(args.config, args.data_root, args.trust_pickle) if args.config else get_preset(args.preset)
    plan = preset.plan(
        attacks=args.attacks, threats=threats, n=args.n, defenses=args.defenses, datasets=args.datasets
    )
    _check_out(args.out)
    executor = None
    if args.executor == "ray":
        from .harness.ray_executor import RayExecutor  # ray is an optional extra

        executor = RayExecutor(address=args.address, num_cpus=args.ray_cpus)
    start = time.perf_counter()
    summary = run_plan(
        plan, workdir=args.workdir, device=args.device, data_root=args.data_root, batch_size=args.batch_size,
        progress=Progress.of(not args.no_progress), autocast=args.autocast, autocast_eval=args.autocast_eval,
        executor=executor, plugins=args.plugin, save_adv=args.save_adv,
    )
    elapsed = time.perf_counter() - start
    print(
        f"preset {plan.name}: {summary.computed} cells computed, {summary.skipped} already done, "
        f"{summary.errors} errors, {elapsed:.1f} s"
    )
    _leaderboard(args.workdir, args.out)
    if args.save_adv:
        print(f"adversarial examples: {Path(args.save_adv).resolve()} (check them: robustbench-lite replay)")
    return EXIT_CELLS_FAILED if summary.errors else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
