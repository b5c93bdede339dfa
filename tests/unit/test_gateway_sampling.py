"""Request fields → protocol SamplingParams, and the 400s that name the client's field."""

from __future__ import annotations

import pytest

from gateway.errors import ApiError, describe_validation_error, most_telling
from gateway.sampling import MAX_DEFAULT_TOKENS, to_sampling
from gateway.schemas import ChatCompletionRequest, CompletionRequest, JobCreate
from gateway.unsupported import check_unsupported

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=MSG, **kw)


def test_fields_map_onto_sampling_params():
    s = to_sampling(chat(max_completion_tokens=7, temperature=0, top_p=0.5, top_k=-1, min_p=0.1, seed=3,
                         stop="END", stop_token_ids=[2], presence_penalty=0.5, frequency_penalty=-0.5,
                         repetition_penalty=1.1, min_tokens=2, ignore_eos=True, logprobs=True,
                         top_logprobs=3), 10, 100, "messages")
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (7, 0.0, 0.5, 0, 0.1, 3)
    assert s.stop == ["END"] and s.stop_token_ids == [2] and s.logprobs == 3 and s.ignore_eos
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_tokens) == (0.5, -0.5, 1.1, 2)
    assert to_sampling(chat(), 10, 100, "messages").logprobs is None
    assert to_sampling(CompletionRequest(model="m", prompt="x", logprobs=2), 1, 100, "prompt").logprobs == 2


def test_default_max_tokens_is_the_rest_of_the_context_capped():
    assert to_sampling(chat(), 10, 100, "messages").max_tokens == 90
    assert to_sampling(chat(), 10, 100_000, "messages").max_tokens == MAX_DEFAULT_TOKENS
    # /v1/completions defaults to 16, as OpenAI's legacy route and vLLM's; a job of a prompt does not.
    assert to_sampling(CompletionRequest(model="m", prompt="x"), 10, 100_000, "prompt").max_tokens == 16
    assert to_sampling(CompletionRequest(model="m", prompt="x"), 90, 100, "prompt").max_tokens == 10
    assert to_sampling(JobCreate(model="m", prompt="x"), 10, 100_000, "prompt").max_tokens == MAX_DEFAULT_TOKENS


def test_completions_take_chats_max_completion_tokens():
    """Ignored, it would cut the answer at the default 16 tokens without a word."""
    def completion(**kw) -> int:
        return to_sampling(CompletionRequest(model="m", prompt="x", **kw), 10, 100_000, "prompt").max_tokens

    assert completion(max_completion_tokens=40) == 40
    assert completion(max_completion_tokens=40, max_tokens=5) == 40  # it wins, as on chat
    with pytest.raises(ApiError) as e:
        completion(max_completion_tokens=100_000)
    assert e.value.param == "max_completion_tokens"


@pytest.mark.parametrize("kw, param, needle", [
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"max_tokens": 0}, "max_tokens", "only on /v1/completions with echo and logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "only on /v1/completions with echo"),
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "20"),
    ({"top_logprobs": 25}, "top_logprobs", "0 to 20 (got 25)"),  # bounded though logprobs is off
    ({"top_logprobs": -1}, "top_logprobs", "0 to 20 (got -1)"),
    ({"stop": [str(i) for i in range(9)]}, "stop", "at most 8"),
    ({"stop": ""}, "stop", "must not be empty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "must not exceed max_tokens (2)"),
    ({"max_tokens": 95}, "max_tokens", "you requested 105 tokens (10 in the prompt, 95 for max_tokens)"),
])
def test_bad_values_name_the_field(kw, param, needle):
    with pytest.raises(ApiError) as e:
        to_sampling(chat(**kw), 10, 100, "messages")
    assert e.value.status == 400 and e.value.param == param and needle in e.value.message


def test_prompt_filling_the_context():
    with pytest.raises(ApiError) as e:
        to_sampling(chat(), 100, 100, "messages")
    assert e.value.param == "messages" and "100 tokens" in e.value.message
    with pytest.raises(ApiError) as e:  # too long on its own, whatever max_tokens asks: the prompt is named
        to_sampling(CompletionRequest(model="m", prompt="x", max_tokens=4), 120, 100, "prompt")
    assert e.value.param == "prompt" and "120 tokens" in e.value.message


def test_choices_bias_and_stop_fields_map_onto_sampling_params():
    s = to_sampling(CompletionRequest(model="m", prompt="x", n=3, best_of=5, logit_bias={"7": -100, "9": 2.5},
                                      include_stop_str_in_output=True), 1, 100, "prompt", vocab_size=100)
    assert (s.n, s.best_of, s.num_sequences, s.include_stop_str_in_output) == (3, 5, 5, True)
    assert s.logit_bias == {7: -100.0, 9: 2.5}
    assert to_sampling(chat(n=16, logit_bias={}), 10, 100, "messages").logit_bias is None
    check_unsupported(chat(n=4, best_of=4))
    check_unsupported(CompletionRequest(model="m", prompt="x", n=2, best_of=4))
    with pytest.raises(ApiError) as e:
        check_unsupported(chat(n=2, best_of=4))
    assert e.value.param == "best_of"


@pytest.mark.parametrize("kw, param, needle", [
    ({"n": 17}, "n", "16"),
    ({"best_of": 0}, "best_of", "greater than or equal to 1"),
    ({"n": 4, "best_of": 3}, "best_of", "best_of: 3 must be at least n (4)"),
    ({"logit_bias": {"3": 100.5}}, "logit_bias.3", "100"),
    ({"logit_bias": {"-1": 1}}, "logit_bias.-1", "greater than or equal to 0"),
    ({"logit_bias": {"100": 1}}, "logit_bias.100", "outside the vocabulary (ids are 0 to 99)"),
])
def test_choice_and_bias_bounds_name_the_field(kw, param, needle):
    with pytest.raises(ApiError) as e:
        to_sampling(CompletionRequest(model="m", prompt="x", **kw), 1, 100, "prompt", vocab_size=100)
    assert e.value.status == 400 and e.value.param == param and needle in e.value.message, e.value.message


def test_best_of_above_n_cannot_stream():
    from gateway.sampling import check_streaming

    sampling = to_sampling(CompletionRequest(model="m", prompt="x", n=2, best_of=3), 1, 100, "prompt")
    check_streaming(sampling, stream=False)
    check_streaming(to_sampling(CompletionRequest(model="m", prompt="x", n=3, best_of=3), 1, 100, "prompt"), True)
    with pytest.raises(ApiError) as e:
        check_streaming(sampling, stream=True)
    assert e.value.param == "best_of" and "streaming" in e.value.message


def test_vocabulary_bounds_token_ids_and_top_k():
    assert to_sampling(chat(stop_token_ids=[99], top_k=100), 10, 100, "messages", vocab_size=100).top_k == 100
    with pytest.raises(ApiError) as e:
        to_sampling(chat(stop_token_ids=[100]), 10, 100, "messages", vocab_size=100)
    assert e.value.param == "stop_token_ids" and "0 to 99" in e.value.message
    with pytest.raises(ApiError) as e:
        to_sampling(chat(top_k=101), 10, 100, "messages", vocab_size=100)
    assert e.value.param == "top_k" and "100" in e.value.message
    for key in ("100", "+100", " 100"):  # each is read as token id 100
        with pytest.raises(ApiError) as e:
            to_sampling(chat(logit_bias={key: 5}), 10, 100, "messages", vocab_size=100)
        assert e.value.param == f"logit_bias.{key}" and "0 to 99" in e.value.message


@pytest.mark.parametrize("kw, param", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_a_field_that_would_do_nothing_alone_is_refused(kw, param):
    with pytest.raises(ApiError) as e:
        check_unsupported(chat(**kw))
    assert e.value.param == param and e.value.code == "unsupported_field"
    check_unsupported(chat(**kw, logprobs=True, stream=True))


def test_job_create_needs_exactly_one_prompt():
    with pytest.raises(ValueError):
        JobCreate(model="m")
    with pytest.raises(ValueError):
        JobCreate(model="m", prompt="a", messages=MSG)
    assert JobCreate(model="m", prompt="a").priority == "default"
    assert chat().priority == "interactive"


@pytest.mark.parametrize("make, kw, param", [
    (chat, {"max_tokens": True}, "max_tokens"),
    (chat, {"temperature": False}, "temperature"),
    (chat, {"stop_token_ids": [2, True]}, "stop_token_ids.1"),
    (chat, {"cache": {"threshold": True}}, "cache.threshold"),
    (lambda **kw: CompletionRequest(model="m", **kw), {"prompt": [1, True]}, "prompt"),
    (lambda **kw: JobCreate(model="m", prompt="x", **kw), {"ttl": True}, "ttl"),
])
def test_true_and_false_are_not_numbers(make, kw, param):
    # pydantic's lax mode read `"max_tokens": true` as one token and `"temperature": false` as greedy.
    with pytest.raises(ValueError) as e:
        make(**kw)
    message, named = describe_validation_error(most_telling(e.value.errors()))
    assert named.startswith(param) and "must be a number (got " in message


def test_a_seed_may_be_negative_as_torch_takes_it():
    assert to_sampling(chat(seed=-7), 10, 100, "messages").seed == -7
    with pytest.raises(ApiError, match="seed"):
        to_sampling(chat(seed=2**63), 10, 100, "messages")


def test_stream_options_refuse_what_they_would_ignore():
    from gateway.errors import UNSUPPORTED

    ok = CompletionRequest(model="m", prompt="x", stream=True, stream_options={"include_usage": True,
                                                                                "include_obfuscation": False})
    assert ok.stream_options.include_usage
    for options, param, code in [({"continuous_usage_stats": True}, "stream_options.continuous_usage_stats",
                                  UNSUPPORTED), ({"bogus_option": 1}, "stream_options.bogus_option", None)]:
        with pytest.raises(ValueError) as e:
            CompletionRequest(model="m", prompt="x", stream=True, stream_options=options)
        err = most_telling(e.value.errors())
        assert describe_validation_error(err)[1] == param and (code is None or err["type"] == code)
