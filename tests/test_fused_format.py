"""The fused engine's one contract (dual_sampling/wire/fused_format.py): what the client sends is
what the route reads and hands the engine, and every argument out of range is refused
naming it, by the same check on both sides."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dual_sampling.wire import fused_format as fmt

ARGS = st.builds(
    fmt.TokenArgs, tag=st.one_of(st.none(), st.text(max_size=8)),
    seed=st.integers(0, 2**63 - 1), alpha=st.one_of(st.none(), st.floats(0.0, 1.0)),
    temperature=st.floats(0.0, 4.0), alpha_method=st.sampled_from(["kl_symmetry"]),
    alpha_min=st.floats(0.0, 0.5), alpha_max=st.floats(0.5, 1.0))


@given(ARGS)
def test_token_args_travel_through_extra_args_unchanged(args):
    assert fmt.TokenArgs.from_extra(args.to_extra()) == args
    assert fmt.TokenArgs.from_extra({"other": 1}) is None


KEY = "extra_args.dual_sampling_fused"


@pytest.mark.parametrize("change,parameter", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": "x"}, "alpha"),
    ({"temperature": -1.0}, "temperature"), ({"alpha_method": "mean"}, "alpha_method"),
    ({"alpha_min": 0.9, "alpha_max": 0.1}, "alpha_min"), ({"alpha_method": "fixed"}, "alpha"),
    ({"alpha_method": "entropy", "alpha": 0.3}, "alpha_method"),
    ({"seed": "7"}, KEY), ({"seed": True}, KEY),
])
def test_every_bad_argument_is_refused_naming_it(change, parameter):
    good = {"tag": "t", "seed": 7}
    with pytest.raises(fmt.TokenArgsError) as caught:
        fmt.TokenArgs.from_extra({fmt.EXTRA_KEY: {**good, **change}})
    assert caught.value.parameter == parameter
    assert parameter.split(".")[-1] in str(caught.value)


def test_the_client_body_is_what_the_route_reads():
    """generate_body's keys are the route's FusedRequest fields (pydantic: a field the route
    did not know would be dropped silently), and the route rebuilds the same TokenArgs."""
    pytest.importorskip("vllm")
    from dual_sampling.vllm_plugin.fused import route
    args = fmt.TokenArgs(tag=None, seed=0, temperature=0.7, alpha_method="entropy",
                         alpha_min=0.5)
    body = fmt.generate_body([[1, 2]], [3], 8, args, stop=["\n"], ignore_eos=True)
    assert set(body) <= set(route.FusedRequest.model_fields)
    assert route._check(route.FusedRequest(**body), vocab_size=10) == args
    default = fmt.generate_body([[1]], [3], 8)
    assert "alpha_method" not in default  # an older server serves default runs as before
    assert route._check(route.FusedRequest(**default), 10) == fmt.TokenArgs(tag=None, seed=0)


def test_a_result_is_read_or_refused():
    result = {"token_ids": [5, 6], "finish_reason": "length",
              **{name: [0.1, 0.2] for name in fmt.TOKEN_FIELDS}}
    ids, fields, finish = fmt.read_result(result)
    assert ids == [5, 6] and finish == "length" and set(fields) == set(fmt.TOKEN_FIELDS)
    for broken in ({**result, "alpha": [0.1]}, {**result, "token_ids": []},
                   {k: v for k, v in result.items() if k != "entropy_q"}):
        with pytest.raises(ValueError):
            fmt.read_result(broken)
    assert dataclasses.replace(fmt.TokenArgs("a", 1), seed=2).seed == 2
