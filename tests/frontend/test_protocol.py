"""Request validation: OpenAI schemas, refused fields, context limits, seeds per choice."""

import pytest
from pydantic import ValidationError

from splitserve.frontend.app import describe_validation_error
from splitserve.frontend.errors import OpenAIError
from splitserve.frontend.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.frontend.serving import build_params, derive_seed

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return ChatCompletionRequest(model="m", messages=MSG, **kw)


def params_for(req, prompt_len=10, max_len=100, **kw):
    defaults = dict(requested_max_tokens=req.max_tokens, max_tokens_param="max_tokens",
                    prompt_param="prompt", num_logprobs=None)
    defaults.update(kw)
    return build_params(req, prompt_len, max_len, **defaults)


def validation_error(schema, **kw):
    with pytest.raises(ValidationError) as ei:
        schema(**kw)
    return describe_validation_error(ei.value.errors())


def test_content_as_text_parts():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[0].text() == "ab"


def test_image_part_refused_naming_messages():
    msg, param = validation_error(ChatCompletionRequest, model="m", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert param == "messages" and "image_url" in msg


def test_unknown_field_named():
    msg, param = validation_error(ChatCompletionRequest, model="m", messages=MSG, bogus=1)
    assert param == "bogus" and "bogus" in msg


def test_out_of_range_named():
    msg, param = validation_error(ChatCompletionRequest, model="m", messages=MSG, temperature=3)
    assert param == "temperature"
    msg, param = validation_error(ChatCompletionRequest, model="m", messages=MSG, n=0)
    assert param == "n"


def test_missing_messages_named():
    msg, param = validation_error(ChatCompletionRequest, model="m")
    assert param == "messages" and "Missing" in msg


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"1": 5}),
])
def test_unimplemented_fields_refused(field, value):
    with pytest.raises(OpenAIError) as ei:
        chat(**{field: value}).check_unsupported()
    assert ei.value.status == 400 and ei.value.param == field


def test_text_response_format_accepted():
    chat(response_format={"type": "text"}).check_unsupported()


def test_top_logprobs_needs_logprobs():
    with pytest.raises(OpenAIError) as ei:
        chat(top_logprobs=2).check_unsupported()
    assert ei.value.param == "top_logprobs"


def test_stream_options_needs_stream():
    with pytest.raises(OpenAIError) as ei:
        chat(stream_options={"include_usage": True}).check_unsupported()
    assert ei.value.param == "stream_options"


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(OpenAIError):
        CompletionRequest(model="m", prompt=[]).prompts()


@pytest.mark.parametrize("field,value", [("echo", True), ("suffix", "x"), ("best_of", 3)])
def test_completion_unimplemented(field, value):
    with pytest.raises(OpenAIError) as ei:
        CompletionRequest(model="m", prompt="a", **{field: value}).check_unsupported()
    assert ei.value.param == field


def test_max_tokens_default_fills_context():
    (p,) = params_for(chat(), prompt_len=10, max_len=100)
    assert p.max_tokens == 90


def test_context_limit_named_in_message():
    with pytest.raises(OpenAIError) as ei:
        params_for(chat(max_tokens=95), prompt_len=10, max_len=100)
    assert ei.value.status == 400 and "100" in ei.value.message and ei.value.param == "max_tokens"
    with pytest.raises(OpenAIError) as ei:
        params_for(chat(), prompt_len=100, max_len=100, prompt_param="messages")
    assert "maximum context length is 100" in ei.value.message and ei.value.param == "messages"


def test_engine_param_errors_become_400():
    req = chat().model_copy(update={"top_k": -5})  # past the schema: the engine's check answers
    with pytest.raises(OpenAIError) as ei:
        params_for(req)
    assert ei.value.status == 400 and ei.value.param == "top_k"


def test_seeds_distinct_per_choice_and_reproducible():
    ps = params_for(chat(n=4, seed=7, temperature=1.0))
    seeds = [p.seed for p in ps]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [p.seed for p in params_for(chat(n=4, seed=7, temperature=1.0))]
    assert [p.seed for p in params_for(chat(n=3))] == [None, None, None]
    assert derive_seed(7, 1) != derive_seed(8, 1)


def test_sampling_defaults_are_openai_defaults():
    (p,) = params_for(chat())
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.logprobs is None
