"""``robustbench-lite replay``: re-judge saved adversarial examples on a model.

    robustbench-lite replay adv/ --model small-cnn --weights model.safetensors --data fashion-mnist

Takes the files ``--save-adv`` wrote (or folders of them) and a model named with ``eval``'s
options.  Each example must lie in the threat ball ∩ [0, 1] around its original test point
(loaded from the data by its index) and carry that point's label; the model must misclassify it.
On the model that made the examples (its state dict hashes to the one the file records) every
example must be misclassified; on another model the share that is, is the transfer rate.  Exit
code 0 when every check holds, 1 when one fails (the lines above the error say which file and
which points), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

from .cli_eval import _int, add_model_options, load_model


def add_replay_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("replay", help="re-judge adversarial examples saved by --save-adv on a model (the same one: every "
                       "example must fool it; another: the transfer rate)")
    r.add_argument("paths", nargs="+", metavar="PATH", help="files written by --save-adv, or folders of them")
    add_model_options(r, data_default="the registered dataset the files name")
    r.add_argument("--batch-size", default="500", help="judging batch size (default 500)")


def run_replay(args: argparse.Namespace) -> int:
    """The ``replay`` command (see the module docstring for its exit codes)."""
    try:
        saved, data, model, policy, batch = _prepare(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"robustbench-lite: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    from .eval.replay import replay
    from .training.weights import state_fingerprint

    mine = state_fingerprint(model)
    failed = []
    total = fooled = 0
    for s in saved:
        same = s.meta["state_fingerprint"] == mine
        res = replay(s, model, data.test, same_model=same, policy=policy, batch_size=batch)
        total, fooled = total + res.count, fooled + res.misclassified
        rate = f"{100 * res.rate:.1f}%" if res.rate is not None else "n/a"
        verdict = "ok" if res.ok else "FAILED"
        what = "made on this model" if same else f"transfer from {s.meta['model']}/{s.meta.get('defense', '?')}"
        print(f"{s.path.name}: {res.attack} at {res.threat}, {res.count} examples ({what}): misclassified "
              f"{res.misclassified}/{res.count} ({rate}); outside the ball: {res.outside_ball}, outside [0, 1]: "
              f"{res.outside_range}, wrong label: {res.wrong_label}  [{verdict}]")
        if res.fooled_rate is not None:
            print(f"  of the {res.clean_correct} points this model classifies correctly without attack, "
                  f"{res.fooled_correct} are misclassified ({100 * res.fooled_rate:.1f}%)")
        if s.meta.get("complete") == "false":
            print("  note: this file lacks the examples of a stage computed by a run without --save-adv")
        if not res.ok:
            failed.append(res)
            print(f"  failing test points (first {len(res.bad)}): {', '.join(map(str, res.bad))}")
    share = f"{100 * fooled / total:.1f}%" if total else "n/a"
    print(f"{len(saved)} file(s), {total} examples: {fooled} misclassified ({share})")
    if failed:
        why = []
        for r in failed:
            if not r.valid:
                why.append(f"{r.outside_ball + r.outside_range + r.wrong_label} example(s) of {r.attack} are not legal "
                           "perturbations of their points")
            elif r.same_model:
                why.append(f"{r.count - r.misclassified} example(s) of {r.attack} are not adversarial on the model that "
                           "made them")
        print(f"robustbench-lite: error: replay failed: {'; '.join(why)}", file=sys.stderr)
        return 1
    return 0


def _prepare(args: argparse.Namespace):
    from .core.device import make_policy
    from .eval.adversarial import example_files, read_examples
    from .eval.replay import data_fingerprint

    batch = _int(args.batch_size, "--batch-size", 1)
    policy = make_policy(args.device, "off")
    files = example_files(args.paths)
    if not files:
        raise ValueError(f"no adversarial-examples files in {', '.join(args.paths)}; pass the folder --save-adv wrote")
    saved = [read_examples(f) for f in files]
    data_arg = args.data
    if data_arg is None:
        names = sorted({s.meta["dataset"] for s in saved})
        if len(names) != 1:
            raise ValueError(f"the files come from several datasets ({', '.join(names)}); replay one dataset at a time, "
                             "with --data")
        data_arg = names[0]
    _, data, _, _, model, _ = load_model(args, data_arg)
    for s in saved:
        if s.n > len(data.test) or data_fingerprint(data.test, s.n) != s.meta["data_fingerprint"]:
            raise ValueError(f"{s.path.name} was made on other points than the first {s.n} of {data_arg!r} (dataset "
                             f"{s.meta['dataset']!r}); pass the --data (and --channels) the examples were made from")
    return saved, data, model, policy, batch
