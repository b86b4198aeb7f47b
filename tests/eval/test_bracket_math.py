"""The bracket of a row's points: certified (union of the proofs) ≤ robust ≤ worst case (attacked,
minus what a proof broke), whatever order the proofs come in."""

from __future__ import annotations

import itertools

import pytest
import torch

from robustbench_lite import ThreatModel
from robustbench_lite.eval.bracket import Proof, attacked_part, bracket, columns, on_row
from robustbench_lite.eval.flags import CERTIFIED_BROKEN

T = ThreatModel("linf", 0.1)


def _m(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_proofs_in_any_order_give_one_bracket_and_name_who_broke_what():
    attacked = _m(1, 1, 1, 1, 0, 0)
    proofs = [
        Proof("ibp", T, _m(1, 0, 0, 0, 0, 0), _m(0, 0, 0, 0, 0, 0)),
        Proof("crown", T, _m(0, 1, 0, 0, 0, 0), _m(0, 0, 0, 0, 0, 0)),
        Proof("bab", T, _m(1, 0, 0, 0, 0, 0), _m(0, 0, 1, 0, 1, 0)),  # point 4: the attacks broke it already
    ]
    seen = set()
    for order in itertools.permutations(proofs):
        b = bracket(attacked, order)
        seen.add((tuple(b.robust.tolist()), tuple(b.certified.tolist()), tuple(b.falsified_by.items()), b.sources))
    assert len(seen) == 1
    b = bracket(attacked, proofs)
    assert b.robust.tolist() == [True, True, False, True, False, False]
    assert b.certified.tolist() == [True, True, False, False, False, False]
    assert b.undecided.tolist() == [False, False, False, True, False, False] and not b.exact
    assert b.falsified_by == {"bab": 1} and b.sources == ("bab", "crown", "ibp")
    assert columns(b.metrics())["falsified_by"] == "bab:1"
    assert torch.equal(attacked_part(b.robust, b.metrics()), attacked)  # what a refresh recovers


def test_exact_rows_and_a_certified_point_broken_is_flagged_never_exact():
    attacked = _m(1, 1, 0)
    robust, metrics, flags = on_row(attacked, T, [Proof("ibp", T, _m(1, 1, 0), _m(0, 0, 0))])
    assert torch.equal(robust, attacked) and metrics["exact"] and metrics["undecided"] == 0 and not flags
    robust, metrics, flags = on_row(attacked, T, [Proof("ibp", T, _m(1, 1, 0), _m(0, 0, 0)),
                                                  Proof("bab", T, _m(0, 0, 0), _m(0, 1, 0))])
    assert robust.tolist() == [True, False, False] and not metrics["exact"] and flags == {CERTIFIED_BROKEN}


def test_proofs_on_other_points_or_another_threat_leave_the_row_as_it_was():
    attacked = _m(1, 0, 1)
    other = [Proof("ibp", ThreatModel("linf", 0.2), _m(1, 0, 0), _m(0, 0, 1)), Proof("ibp", T, _m(1, 0), _m(0, 0))]
    robust, metrics, flags = on_row(attacked, T, other)
    assert torch.equal(robust, attacked) and metrics == {} and flags == set()
    with pytest.raises(ValueError, match="same points"):
        bracket(attacked, other[1:])
