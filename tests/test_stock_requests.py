"""Stock OpenAI requests on every kind of server this project starts, through the OpenAI
Python client and through raw HTTP: each gets what it asks for or a 400 that says what the
server cannot do, never a 500. Also the bad values on this project's own routes.

Kinds: `theta` and `target` (the pair of `start_vllm.sh --theta A --target B`; a lone
`--model` server runs with theta's arguments), `fused` and `speculative` (`--fused`, and
`--fused --speculate 3`). Each uses a session fixture of conftest.py, so no server starts
here that the suite does not start anyway; run one kind alone (one fixture's servers) with

    python -m pytest -q tests/test_stock_requests.py -k on_fused   # on_theta, on_speculative
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import openai
import pytest

from dual_sampling.wire.fused_format import GENERATE_PATH as FUSED_PATH
from dual_sampling.wire.fused_format import COUNTERS_PATH

pytestmark = pytest.mark.server

KINDS = ("theta", "target", "fused", "speculative")
FUSED_KINDS = ("fused", "speculative")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "The standard library module"
# the arguments the OpenAI client takes by name; the rest go in extra_body (vLLM's own)
TYPED = {COMPLETIONS: {"model", "prompt", "max_tokens", "logprobs", "n", "stop", "echo",
                       "top_p", "temperature", "seed", "presence_penalty",
                       "frequency_penalty", "logit_bias"},
         CHAT: {"model", "messages", "max_tokens", "logprobs", "top_logprobs", "n", "stop",
                "top_p", "temperature", "seed", "presence_penalty", "frequency_penalty",
                "logit_bias", "response_format"}}


@pytest.fixture(scope="module", params=KINDS, ids=[f"on_{k}" for k in KINDS])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def url(kind, request) -> str:
    """The kind's server (its session fixture starts it on first use)."""
    fixture, role = {"theta": ("servers", "theta"), "target": ("servers", "target"),
                     "fused": ("fused_server", "fused"),
                     "speculative": ("spec_server", "fused")}[kind]
    return request.getfixturevalue(fixture).url(role)


def model_of(kind: str) -> str:
    return "fused" if kind in FUSED_KINDS else kind


def ask(via: str, url: str, path: str, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request, sent by the OpenAI client or as raw HTTP."""
    if via == "http":
        request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, {"error": {"message": text.decode(errors="replace")}}
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    create = client.completions.create if path == COMPLETIONS else client.chat.completions.create
    typed = {k: v for k, v in body.items() if k in TYPED[path]}
    extra = {k: v for k, v in body.items() if k not in TYPED[path]}
    try:
        return 200, create(**typed, extra_body=extra or None).model_dump()
    except openai.APIStatusError as exc:
        error = exc.body if isinstance(exc.body, dict) else {"message": str(exc)}
        return exc.status_code, error if "error" in error else {"error": error}


def ok(status: int, body: dict) -> dict:
    assert status == 200, f"HTTP {status}: {body}"
    return body


def refused(status: int, body: dict, *words: str) -> str:
    """The message of a 400 that names each of `words`."""
    assert status == 400, f"HTTP {status}, not 400: {body}"
    message = body["error"]["message"]
    for word in words:
        assert word in message, f"{word!r} not in the 400's message: {message}"
    return message


def complete(kind: str, via: str, url: str, **options) -> dict:
    body = {"model": model_of(kind), "prompt": PROMPT, "max_tokens": 6, "seed": 11,
            "ignore_eos": True, **options}
    return ok(*ask(via, url, COMPLETIONS, body))


VIAS = pytest.mark.parametrize("via", ["openai", "http"])


@VIAS
def test_logprobs_zero_gives_the_sampled_tokens_logprob_only(kind, url, via):
    choice = complete(kind, via, url, logprobs=0)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top == {token: logprob} and -50 < logprob <= 0


@VIAS
def test_logprobs_k_are_the_top_k_and_the_sampled_tokens(kind, url, via):
    lp = complete(kind, via, url, logprobs=3, temperature=0.8)["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) in (3, 4) and top[token] == logprob
        ranked = sorted(top.values(), reverse=True)
        assert sum(math.exp(v) for v in ranked[:3]) <= 1 + 1e-5
        assert logprob <= ranked[0]


def test_completion_logprobs_are_the_scored_prompts(kind, url):
    """Each emitted token's logprob is the one the server gives the same token as part of a
    prompt (prompt_logprobs): on a speculative server, drafted and bonus tokens alike."""
    prompt = [0, 51, 85, 97, 12]
    choice = complete(kind, "http", url, prompt=prompt, max_tokens=8, logprobs=0,
                      return_token_ids=True)["choices"][0]
    ids = choice["token_ids"]
    scored = complete(kind, "http", url, prompt=prompt + ids, max_tokens=1,
                      prompt_logprobs=0)["choices"][0]["prompt_logprobs"]
    for t, token in enumerate(ids):
        expected = scored[len(prompt) + t][str(token)]["logprob"]
        assert choice["logprobs"]["token_logprobs"][t] == pytest.approx(expected, abs=2e-4)


@VIAS
def test_top_k_one_tiny_top_p_and_min_p_one_give_the_greedy_tokens(kind, url, via):
    """Each restricts the distribution sampled (q* on fused kinds) to its argmax."""
    greedy = complete(kind, via, url, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    for options in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        if kind == "speculative" and "min_p" in options:  # vLLM's own refusal
            body = {"model": "fused", "prompt": PROMPT, "max_tokens": 2, **options}
            refused(*ask(via, url, COMPLETIONS, body), "min_p", "speculative")
            continue
        for seed in (1, 2):
            text = complete(kind, via, url, max_tokens=8, temperature=1.0, seed=seed,
                            **options)["choices"][0]["text"]
            assert text == greedy, options


@VIAS
def test_n_two_gives_two_choices(kind, url, via):
    reply = complete(kind, via, url, n=2, logprobs=1, temperature=1.0)
    assert sorted(c["index"] for c in reply["choices"]) == [0, 1]
    for choice in reply["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 6
    assert reply["usage"]["completion_tokens"] == 12


@VIAS
def test_a_stop_string_stops(kind, url, via):
    full = complete(kind, via, url, max_tokens=12, temperature=0.0,
                    logprobs=0)["choices"][0]
    pieces = full["logprobs"]["tokens"]
    stop = next(p for p in pieces[3:] if p.strip() and p in full["text"])
    choice = complete(kind, via, url, max_tokens=12, temperature=0.0,
                      stop=[stop])["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full["text"][:full["text"].index(stop)]


@VIAS
def test_echo_returns_the_prompt_with_its_logprobs(kind, url, via):
    choice = complete(kind, via, url, echo=True, logprobs=1, max_tokens=2)["choices"][0]
    assert choice["text"].startswith(PROMPT)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) > 2
    assert all(v <= 0 for v in lp["token_logprobs"][1:])


@VIAS
@pytest.mark.parametrize("top_logprobs", [0, 2])
def test_chat_completions_with_logprobs_and_n(kind, url, via, top_logprobs):
    body = {"model": model_of(kind), "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5, "logprobs": True, "top_logprobs": top_logprobs, "n": 2,
            "seed": 5, "top_p": 0.9, "ignore_eos": True}
    reply = ok(*ask(via, url, CHAT, body))
    assert len(reply["choices"]) == 2
    for choice in reply["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 5
        for entry in content:
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == top_logprobs


# what a fused engine does not apply to q* (it would be lost silently), and the speculative
# engine's penalties: a 400 naming the parameter; every other server honours them
NOT_ON_FUSED = [({"logit_bias": {"5": 50}}, "logit_bias", FUSED_KINDS),
                ({"allowed_token_ids": [5, 6, 7]}, "allowed_token_ids", FUSED_KINDS),
                ({"bad_words": ["the"]}, "bad_words", FUSED_KINDS),
                ({"min_tokens": 3}, "min_tokens", FUSED_KINDS),
                ({"structured_outputs": {"choice": ["yes", "no"]}}, "structured_outputs",
                 FUSED_KINDS),
                ({"presence_penalty": 0.5}, "presence_penalty", ("speculative",)),
                ({"repetition_penalty": 1.3}, "repetition_penalty", ("speculative",))]


@VIAS
@pytest.mark.parametrize("options,name,refused_on", NOT_ON_FUSED,
                         ids=[case[1] for case in NOT_ON_FUSED])
def test_what_a_server_cannot_apply_is_a_400_naming_it(kind, url, via, options, name,
                                                       refused_on):
    body = {"model": model_of(kind), "prompt": PROMPT, "max_tokens": 3, **options}
    status, reply = ask(via, url, COMPLETIONS, body)
    if kind in refused_on:
        refused(status, reply, name)
    else:
        ok(status, reply)


# -- this project's own routes: a bad value is a 400 that names the field -----------------
def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    return ask("http", url, path, body)


@pytest.mark.parametrize("field,value", [("alpha", 1.5), ("alpha", -0.1),
                                         ("temperature", -1.0), ("max_tokens", 0),
                                         ("alpha", "half")])
def test_the_fused_route_refuses_bad_values_naming_them(kind, url, field, value):
    body = {"prompts": [[0, 51, 85]], "seeds": [1], "max_tokens": 4, field: value}
    refused(*post(url, FUSED_PATH, body), field)  # before a plain server's 409


def test_the_fused_route_refuses_a_seed_count_and_ids_naming_them(kind, url):
    if kind not in FUSED_KINDS:
        pytest.skip("the fused route answers 409 on this kind")
    refused(*post(url, FUSED_PATH, {"prompts": [[0, 1]], "seeds": [1, 2], "max_tokens": 2}),
            "seed")
    refused(*post(url, FUSED_PATH, {"prompts": [[0, 10 ** 6]], "seeds": [1],
                                     "max_tokens": 2}), "prompt 0")
    with urllib.request.urlopen(url + COUNTERS_PATH, timeout=60) as reply:
        assert "steps" in json.loads(reply.read())


@pytest.mark.parametrize("body,field", [({"sequences": [[0, 1, 2]], "k": 0}, "k"),
                                        ({"sequences": [], "k": 2}, "sequences"),
                                        ({"sequences": [[0, 1]], "k": 2, "format": "fp8"},
                                         "format"),
                                        ({"sequences": [[0, 1]], "k": "two"}, "k")])
def test_the_topk_route_refuses_bad_values_naming_them(kind, url, body, field):
    refused(*post(url, "/v1/topk", {**body, "response": "json"}), field)


def test_load_theta_without_a_path_is_a_400_naming_it(kind, url):
    refused(*post(url, "/v1/dual_sampling/load_theta", {"pth": "/nowhere"}), "path")
