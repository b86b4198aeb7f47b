"""Saved adversarial examples: an evaluation with a sink hands over an example for exactly the
points its worst case counts broken (attacks, adaptive reruns and escalation steps together), each
one misclassified and inside the ball; the file format round-trips; replay re-judges a file and
catches examples outside the ball, with a wrong label or not adversarial."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustbench_lite import create_attack, evaluate
from robustbench_lite.eval.adversarial import AdvExamples, example_files, read_examples, write_examples
from robustbench_lite.eval.escalate import Escalation
from robustbench_lite.eval.replay import data_fingerprint, replay

EPS, N = 0.1, 40


class Quantize(nn.Module):
    """Rounds to 15 grey levels without BPDA: a zero input gradient (a masking check fires)."""

    def forward(self, x):
        return torch.round(x * 15) / 15


class Sink:
    """Every call, as (kind, name, examples)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, AdvExamples]] = []

    def attack(self, position, attack, examples, *, adaptive):
        self.calls.append(("adaptive" if adaptive else "attack", attack.name, examples))

    def escalation(self, threat, step, attacks, examples):
        self.calls.append(("escalation", step, examples))


def _attacks():
    return [create_attack("fgsm", eps=EPS), create_attack("pgd", eps=EPS, steps=5)]


def test_a_sink_gets_an_adversarial_example_for_every_point_the_worst_case_counts_broken(digits_model, digits):
    lying = nn.Sequential(Quantize(), digits_model).eval()
    ladder = Escalation(noise_steps=3, noise_samples=2, transfer_steps=3, square_queries=40)
    sink = Sink()
    ev = evaluate(lying, _attacks(), digits.test, n=N, escalation=ladder, adv_sink=sink, probe_iterations=False)
    kinds = {k for k, _, _ in sink.calls}
    assert {"attack", "adaptive", "escalation"} <= kinds, kinds  # the zero gradient made it rerun and escalate
    assert all(r.examples is None for r in ev.records)  # the tensors went to the sink, not into the records
    broken = ev.correct & ~next(iter(ev.worst_case.values()))
    saved = torch.zeros(N, dtype=torch.bool)
    split = digits.test.head(N)
    for _, _, ex in sink.calls:
        saved[ex.index] = True
        assert torch.equal(ex.label, split.y[ex.index])
        with torch.no_grad():
            assert torch.equal(lying(ex.x_adv).argmax(1), ex.pred) and bool((ex.pred != ex.label).all())
        assert bool(((ex.x_adv - split.x[ex.index]).abs().flatten(1).amax(1) <= EPS + 1e-6).all())
    assert broken.any() and torch.equal(saved, broken)


def test_without_a_sink_nothing_is_kept(digits_model, digits):
    ev = evaluate(digits_model, _attacks()[:1], digits.test, n=N, probe_iterations=False)
    assert ev.records[0].robust_acc < ev.clean_acc and all(r.examples is None for r in ev.records)


def _saved(tmp_path, digits_model, digits):
    """FGSM's examples on the digits model, written with the metadata the harness writes."""
    sink = Sink()
    evaluate(digits_model, _attacks()[:1], digits.test, n=N, adv_sink=sink, probe_iterations=False)
    (_, _, ex), = sink.calls
    from robustbench_lite.training.weights import state_fingerprint

    meta = {"dataset": "digits", "data_fingerprint": data_fingerprint(digits.test, N), "n": str(N), "norm": "linf",
            "eps": repr(EPS), "attack": "fgsm", "attack_params": json.dumps({"eps": EPS}), "model": "small-cnn",
            "model_key": "k", "state_fingerprint": state_fingerprint(digits_model)}
    return write_examples(tmp_path / "fgsm.safetensors", ex, meta), ex, meta


def test_a_file_round_trips_and_replays_on_the_model_that_made_it(tmp_path, digits_model, digits):
    path, ex, meta = _saved(tmp_path, digits_model, digits)
    back = read_examples(path)
    assert len(back.examples) == len(ex) > 0 and back.meta["count"] == str(len(ex))
    for name in ("index", "x_adv", "label", "pred"):
        assert torch.equal(getattr(back.examples, name), getattr(ex, name))
    assert {k: back.meta[k] for k in meta} == meta and back.threat.eps == EPS
    res = replay(back, digits_model, digits.test, same_model=True, batch_size=7)
    assert res.ok and res.misclassified == res.count == len(ex) and res.rate == 1.0
    assert example_files([tmp_path]) == [path]


def test_replay_catches_examples_outside_the_ball_with_a_wrong_label_or_not_adversarial(tmp_path, digits_model, digits):
    path, ex, meta = _saved(tmp_path, digits_model, digits)
    x0 = digits.test.x[ex.index]
    far = ex.x_adv.clone()
    far[0] = (x0[0] + 0.5).clamp(0, 1)  # far outside the Linf 0.1 ball
    res = replay(read_examples(write_examples(tmp_path / "far.safetensors", AdvExamples(ex.index, far, ex.label, ex.pred),
                                              meta)), digits_model, digits.test, same_model=False)
    assert res.outside_ball == 1 and not res.valid and not res.ok and res.bad == (int(ex.index[0]),)
    label = ex.label.clone()
    label[1] = (label[1] + 1) % 10
    res = replay(read_examples(write_examples(tmp_path / "label.safetensors", AdvExamples(ex.index, ex.x_adv, label, ex.pred),
                                              meta)), digits_model, digits.test, same_model=True)
    assert res.wrong_label == 1 and not res.ok
    clean = ex.x_adv.clone()
    clean[2] = x0[2]  # the clean point: inside the ball, and (FGSM only attacked correct points) not misclassified
    res = replay(read_examples(write_examples(tmp_path / "clean.safetensors", AdvExamples(ex.index, clean, ex.label, ex.pred),
                                              meta)), digits_model, digits.test, same_model=True)
    assert res.valid and res.misclassified == res.count - 1 and not res.ok and res.bad == (int(ex.index[2]),)
    # the same file on another model is a transfer measurement, not a failure; every original point was
    # classified correctly (FGSM attacked only those), so the rate among them is the plain rate
    other = replay(read_examples(tmp_path / "clean.safetensors"), digits_model, digits.test, same_model=False)
    assert other.ok and other.clean_correct == other.count and other.fooled_correct == other.misclassified == other.count - 1
    assert res.clean_correct is None  # on the same model there is nothing to separate


def test_read_examples_refuses_other_files(tmp_path, digits_model):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in digits_model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not an adversarial-examples file"):
        read_examples(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_examples(tmp_path / "junk.safetensors")
    assert example_files([tmp_path]) == []  # a folder's other files are skipped
    with pytest.raises(FileNotFoundError):
        example_files([tmp_path / "nope"])
