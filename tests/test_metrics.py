"""Continual-learning metrics against loss matrices computed by hand."""
import math

import pytest

from evolm.metrics import (average_final_loss, backward_transfer, forgetting, forward_transfer, infer_learned_at,
                           perplexity, summarize)

# rows: base, after a, after b, after c; columns: the base's own domain, then stages a, b, c
L4 = [[4.0, 6.0, 6.0, 6.0],
      [4.5, 3.0, 5.5, 5.8],
      [4.8, 4.0, 3.5, 5.0],
      [4.6, 2.8, 4.5, 4.0]]
LEARNED4 = [0, 1, 2, 3]
JSON4 = {"columns": ["general", "a", "b", "c"], "rows": ["base", "a", "b", "c"], "matrix": L4, "split": "test"}

L3 = [[2.0, 5.0, 5.0],
      [2.5, 1.0, 4.0],
      [2.2, 1.5, 2.0]]


def test_average_final_loss_and_perplexity():
    assert average_final_loss(L4) == pytest.approx((4.6 + 2.8 + 4.5 + 4.0) / 4)
    assert perplexity(2.0) == pytest.approx(math.e ** 2)
    assert perplexity(1e6) == math.inf


def test_forgetting_is_the_final_loss_minus_the_best_since_learning():
    # general: 4.6 - min(4.0, 4.5, 4.8, 4.6); a: 2.8 - min(3.0, 4.0, 2.8) (it improved later);
    # b: 4.5 - min(3.5, 4.5); c: the last stage forgets nothing
    assert forgetting(L4, LEARNED4) == pytest.approx([0.6, 0.0, 1.0, 0.0])
    assert forgetting(L3, [0, 1, 2]) == pytest.approx([0.2, 0.5, 0.0])


def test_backward_transfer_averages_every_learned_column_but_the_last_stage():
    # (4.0 - 4.6) + (3.0 - 2.8) + (3.5 - 4.5), over 3 columns
    assert backward_transfer(L4, LEARNED4) == pytest.approx((-0.6 + 0.2 - 1.0) / 3)
    assert backward_transfer(L3, [0, 1, 2]) == pytest.approx((-0.2 - 0.5) / 2)
    assert backward_transfer([[3.0], [2.0]], [1]) is None  # one stage, no base domain: nothing to transfer to


def test_forward_transfer_compares_the_model_before_each_stage_with_the_base():
    # a: base before a -> 0; b: 6.0 - 5.5 (after a); c: 6.0 - 5.0 (after b)
    assert forward_transfer(L4, LEARNED4) == pytest.approx([None, 0.0, 0.5, 1.0])


def test_summarize_writes_every_metric():
    s = summarize(JSON4)
    assert s["learned_at"] == LEARNED4
    assert s["average_final_loss"] == pytest.approx(3.975)
    assert s["average_final_perplexity"] == pytest.approx(math.exp(3.975))
    assert s["final_perplexity"]["a"] == pytest.approx(math.exp(2.8))
    assert s["forgetting"] == pytest.approx({"general": 0.6, "a": 0.0, "b": 1.0, "c": 0.0})
    assert s["mean_forgetting"] == pytest.approx(0.5)  # stages a and b; c is the last
    assert s["backward_transfer"] == pytest.approx((0.2 - 1.0) / 2)  # stages a and b, as docs/design.md defines BWT
    assert s["forward_transfer"] == pytest.approx({"general": None, "a": 0.0, "b": 0.5, "c": 1.0})
    assert s["mean_forward_transfer"] == pytest.approx(0.75)  # stages b and c; a's is 0 by definition


def test_summarize_of_an_unfinished_run_leaves_unreached_stages_out():
    partial = {"columns": ["general", "a", "b"], "rows": ["base", "a"], "matrix": L3[:2]}
    s = summarize(partial)
    assert s["learned_at"] == [0, 1, None]
    assert s["forgetting"] == pytest.approx({"general": 0.5, "a": 0.0, "b": None})
    assert s["backward_transfer"] is None  # only one stage learned: no earlier stage to transfer to
    assert s["mean_forgetting"] is None and s["mean_forward_transfer"] is None


def test_learned_at_is_inferred_from_names_or_taken_as_given():
    assert infer_learned_at(["general", "a", "b"], ["base", "a", "b"]) == [0, 1, 2]
    assert infer_learned_at(["a", "b"], ["base", "a"]) == [1, None]
    s = summarize({**JSON4, "learned_at": [0, 1, 2, 3]}, learned_at=[1, 1, 2, 3])  # the argument wins
    assert s["forgetting"]["general"] == pytest.approx(4.6 - 4.5)


@pytest.mark.parametrize("matrix, learned_at, match", [
    ([[1.0, 2.0], [1.0]], [0, 1], "different lengths"),
    ([[1.0, 2.0], [1.0, 2.0]], [0], "one per column"),
    ([[1.0, 2.0], [1.0, 2.0]], [0, 2], "row indices"),
])
def test_bad_matrices_are_refused(matrix, learned_at, match):
    with pytest.raises(ValueError, match=match):
        forgetting(matrix, learned_at)
