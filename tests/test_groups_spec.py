"""Issue 6 groundwork: the reference maths of l1 and decoupled weight decay, the group
spec (resolve_groups) and FlatParams names. The kernels and MomentumSGD(groups=...) come
next (see GROUPS.md)."""

import numpy as np
import pytest

import gpu_momentum as gm
from gpu_momentum._hyperparams import Hyperparameters
from gpu_momentum.groups import resolve_groups
from gpu_momentum.reference import reference_step


def test_l1_adds_l1_times_the_sign_of_p():
    p = np.array([2.0, -3.0, 0.0, 0.0])
    g = np.array([0.5, 0.5, 0.5, -0.0])
    new_p, v = reference_step(p, g, np.zeros(4), lr=0.1, l1=0.25, first_step=True)
    np.testing.assert_array_equal(v, -0.1 * (g + np.array([0.25, -0.25, 0.0, 0.0])))
    np.testing.assert_array_equal(new_p, p + v)
    # sign(0) = 0 by branches: a -0.0 gradient stays -0.0, as the kernels will leave it
    assert np.signbit(reference_step(p, g, np.zeros(4), lr=0.0, l1=0.25, style="torch",
                                     first_step=True)[1][3])


@pytest.mark.parametrize("style", ["classic", "torch"])
def test_decoupled_weight_decay_scales_p_before_the_momentum_update(style):
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(100), rng.standard_normal(100)
    new_p, v = reference_step(p, g, np.zeros(100), lr=0.1, weight_decay=0.01, style=style,
                              decoupled_weight_decay=True, first_step=True)
    plain_p, plain_v = reference_step(p, g, np.zeros(100), lr=0.1, style=style,
                                      first_step=True)
    np.testing.assert_array_equal(v, plain_v)  # no weight_decay * p in the gradient
    decayed = p * (1 - 0.1 * 0.01)
    expected = decayed + v if style == "classic" else decayed - 0.1 * v
    np.testing.assert_array_equal(new_p, expected)
    coupled_p, coupled_v = reference_step(p, g, np.zeros(100), lr=0.1, weight_decay=0.01,
                                          style=style, first_step=True)
    assert not np.array_equal(coupled_v, v)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError)])
def test_l1_is_validated(bad, error):
    with pytest.raises(error, match=r"Invalid l1 value"):
        Hyperparameters(lr=0.1, l1=bad)


def test_decoupled_weight_decay_is_a_flag():
    with pytest.raises(TypeError, match=r"Invalid decoupled_weight_decay value"):
        Hyperparameters(lr=0.1, decoupled_weight_decay=1)


DEFAULTS = Hyperparameters(lr=0.1, momentum=0.9)
NAMES = ["stem", "block.w", "block.b", "head.w", "head.b"]
OFFSETS = [0, 16, 48, 52, 100]
TOTAL = 104


def test_groups_become_merged_contiguous_ranges():
    plan = resolve_groups([{"params": ["head.w", "head.b"], "lr": 0.01},
                           {"params": [0], "weight_decay": 1e-4, "l1": 1e-5}],
                          DEFAULTS, OFFSETS, TOTAL, NAMES)
    assert [h.lr for h in plan.hypers] == [0.1, 0.01, 0.1]
    assert plan.hypers[2].weight_decay == 1e-4 and plan.hypers[2].l1 == 1e-5
    assert plan.segment_groups == (2, 0, 0, 1, 1)
    assert plan.range_ends.tolist() == [16, 52, 104]  # padding goes with its segment
    assert plan.range_groups.tolist() == [2, 0, 1]


def test_no_groups_is_one_range():
    plan = resolve_groups(None, DEFAULTS, OFFSETS, TOTAL, NAMES)
    assert plan.hypers == (DEFAULTS,)
    assert (plan.range_ends.tolist(), plan.range_groups.tolist()) == ([104], [0])


GROUP_ERRORS = [
    ("not-a-list", {"params": [0]}, TypeError, r"groups must be a list of dicts"),
    ("not-a-dict", [[0]], TypeError, r"groups\[0\] must be a dict"),
    ("no-params", [{"lr": 0.1}], ValueError, r"groups\[0\] has no 'params'"),
    ("empty-params", [{"params": []}], ValueError, r"names at least one segment"),
    ("params-not-a-list", [{"params": 3}], TypeError, r"params must be a list"),
    ("unknown-option", [{"params": [0], "betas": 0.9}], ValueError,
     r"groups\[0\] has unknown option 'betas'"),
    ("unknown-name", [{"params": ["tail"]}], ValueError, r"no segment is named 'tail'"),
    ("index-out-of-range", [{"params": [5]}], ValueError, r"segment 5 does not exist"),
    ("bool-index", [{"params": [True]}], TypeError, r"a segment index or name"),
    ("overlapping", [{"params": [1]}, {"params": ["block.w"]}], ValueError,
     r"groups\[1\]: segment 1 \('block.w'\) is named by groups\[0\] too"),
    ("twice", [{"params": [1, 1]}], ValueError, r"is named by it twice"),
    ("bad-lr", [{"params": [0]}, {"params": [1], "lr": -1.0}], ValueError,
     r"groups\[1\]: Invalid lr value: -1.0"),
    ("bad-nesterov", [{"params": [0], "momentum": 0.0, "nesterov": True}], ValueError,
     r"groups\[0\]: Invalid nesterov value"),
]


@pytest.mark.parametrize("id_, groups, error, pattern", GROUP_ERRORS,
                         ids=[e[0] for e in GROUP_ERRORS])
def test_bad_groups_are_named(id_, groups, error, pattern):
    with pytest.raises(error, match=pattern):
        resolve_groups(groups, DEFAULTS, OFFSETS, TOTAL, NAMES)


def test_names_need_a_named_flat_params():
    with pytest.raises(ValueError, match=r"the FlatParams has no names"):
        resolve_groups([{"params": ["stem"]}], DEFAULTS, OFFSETS, TOTAL)


def test_flat_params_keep_their_names():
    flat = gm.FlatParams.from_arrays([np.zeros(3), np.zeros(2)], names=["w", "b"])
    assert flat.names == ["w", "b"]
    assert gm.FlatParams.from_arrays([np.zeros(3)]).names is None


@pytest.mark.parametrize("names, error, pattern", [
    ("wb", TypeError, r"names must be a list of strings"),
    (["w"], ValueError, r"names must be 2 non-empty strings"),
    (["w", ""], ValueError, r"names must be 2 non-empty strings"),
    (["w", "w"], ValueError, r"'w' is given twice"),
])
def test_bad_names_are_refused(names, error, pattern):
    with pytest.raises(error, match=pattern):
        gm.FlatParams.from_arrays([np.zeros(3), np.zeros(2)], names=names)
