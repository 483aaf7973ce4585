"""Constrained decoding in the engine: JSON schemas, tool calls, the default model's tool template (tiny models)."""

import json
import random

import jsonschema
import pytest
import torch
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.chat_templates import SMOLLM2_TOOLS
from adaskip_rag.constrained import parse_tool_calls

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "boolean"}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
}
CHAT = [{"role": "user", "content": "Retrieved context: the fox jumps. Question: what jumps? Answer in JSON."}]
PLANS = [SkipPlan(), SkipPlan(attn={1: 1.0}, ffn={2: 0.9}), SkipPlan(prefill_attn={0: 1.0, 3: 1.0}, tail=4)]


@pytest.fixture(scope="module")
def tool_engine(tokenizer):
    """A tiny model behind the default model's tool-calling template."""
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = SMOLLM2_TOOLS
    return AdaSkipEngine(tiny_model("qwen2"), tok, name="tiny-tools")


@pytest.mark.parametrize("plan", PLANS, ids=["full", "skips", "kv-kept-tail"])
def test_json_schema_answers_validate_with_and_without_skips(tiny_engine, plan):
    result = tiny_engine.generate(CHAT, plan, json_schema=SCHEMA, max_new_tokens=64)
    assert result.stats.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), SCHEMA)
    unconstrained = tiny_engine.generate(CHAT, plan, max_new_tokens=16)
    with pytest.raises(ValueError):  # the random model alone writes no JSON: the grammar did the work
        json.loads(unconstrained.text)


def test_json_schema_from_text_and_pydantic_and_streaming(tiny_engine):
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        ok: bool
        count: int = Field(ge=0, le=99)  # bounded: a random model would write digits to the token limit

    result = tiny_engine.generate(CHAT, json_schema=Answer, max_new_tokens=64)
    Answer.model_validate_json(result.text)
    stream = tiny_engine.stream(CHAT, json_schema=json.dumps(SCHEMA), max_new_tokens=64, temperature=1.0, seed=3)
    text = "".join(stream)
    assert text == stream.result.text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_constrained_greedy_step_is_the_best_allowed_token(tiny_engine):
    """The first answer token is the model's argmax among the tokens that begin one of the enum's JSON texts,
    computed here from the model's logits and the vocabulary."""
    choices = ['"alpha"', '"beta"', '"gamma"']
    result = tiny_engine.generate(CHAT, json_schema={"enum": ["alpha", "beta", "gamma"]}, max_new_tokens=16)
    assert result.text in choices
    ids = tiny_engine.encode(CHAT)
    with torch.no_grad():
        logits = tiny_engine.model(torch.tensor([ids])).logits[0, -1]
    tok = tiny_engine.tokenizer
    allowed = [t for t in range(len(logits)) if (s := tok.decode([t])) and any(c.startswith(s) for c in choices)]
    assert result.token_ids[0] == max(allowed, key=lambda t: logits[t])


@pytest.mark.parametrize("plan", PLANS[:2], ids=["full", "skips"])
def test_tool_calls_follow_their_schema(tool_engine, plan):
    forced = tool_engine.generate(CHAT, plan, tools=[WEATHER, ADD], tool_choice="any", max_new_tokens=128)
    assert forced.stats.finish_reason == "stop" and forced.text == "" and not forced.invalid_tool_calls
    [call] = forced.tool_calls
    tool = {"get_weather": WEATHER, "add": ADD}[call["name"]]
    jsonschema.validate(call["arguments"], tool["function"]["parameters"])
    named = tool_engine.generate(CHAT, plan, tools=[WEATHER, ADD], tool_choice="add", max_new_tokens=64)
    assert [c["name"] for c in named.tool_calls] == ["add"] and isinstance(named.tool_calls[0]["arguments"]["a"], bool)
    none = tool_engine.generate(CHAT, plan, tools=[WEATHER, ADD], tool_choice="none", max_new_tokens=24)
    assert none.tool_calls == [] and "<tool_call>" not in none.text


def test_streamed_tool_calls_are_parsed_not_streamed(tool_engine):
    stream = tool_engine.stream(CHAT, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=64)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == ""
    assert [c["name"] for c in stream.result.tool_calls] == ["get_weather"]


def test_parallel_tool_calls_are_all_parsed(tool_engine):
    result = tool_engine.generate(
        CHAT, tools=[WEATHER, ADD], tool_choice="any", parallel_tool_calls=True, max_new_tokens=80
    )
    assert result.tool_calls
    assert not result.invalid_tool_calls or result.stats.finish_reason == "length"  # only a cut call is invalid
    for call in result.tool_calls:
        jsonschema.validate(
            call["arguments"], {"get_weather": WEATHER, "add": ADD}[call["name"]]["function"]["parameters"]
        )


def test_a_tool_result_turn_renders_and_answers(tool_engine):
    call = {
        "type": "function",
        "id": "c1",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}},
    }
    history = [
        *CHAT,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text = tool_engine.apply_chat_template(history, [WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.count('"name": "get_weather"') == 2  # the schema in the system turn and the call
    assert tool_engine.generate(history, tools=[WEATHER], max_new_tokens=8).stats.generated_tokens > 0


def test_default_template_renders_conversations_without_tools_as_the_bundled_one(tokenizer):
    bundled = tokenizer.chat_template
    conversations = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"},
        ],
        [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}, {"role": "user", "content": "y"}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            ours = tokenizer.apply_chat_template(
                messages, chat_template=SMOLLM2_TOOLS, tokenize=False, add_generation_prompt=prompt
            )
            assert ours == tokenizer.apply_chat_template(
                messages, chat_template=bundled, tokenize=False, add_generation_prompt=prompt
            )


def test_parse_tool_calls_splits_text_calls_and_invalid_calls():
    text = (
        'Let me check.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": [1]}\n</tool_call><tool_call>\n{"name": "h", "argu'
    )
    content, calls, invalid = parse_tool_calls(text)
    assert content == "Let me check.\n"
    assert [(c["name"], c["arguments"]) for c in calls] == [("f", {"x": 1})]
    assert [c["arguments"] for c in invalid] == ['{"name": "g", "arguments": [1]}', '{"name": "h", "argu']
    assert len({c["id"] for c in calls + invalid}) == 3
    assert parse_tool_calls("\n<tool_call>{}</tool_call>\n")[0] == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tools": [WEATHER], "json_schema": SCHEMA}, "json_schema or tools"),
        ({"tool_choice": "any"}, "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": "nope"}, "tool_choice must be"),
        ({"tools": []}, "non-empty list"),
        ({"tools": [{"type": "function", "function": {}}]}, r"tools\[0\]"),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"json_schema": 5}, "json_schema must be"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": SCHEMA, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_bad_constraints_raise_before_generation(tool_engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tool_engine.stream(CHAT, **kwargs)


def test_tools_need_a_template_that_supports_them(tiny_engine, tool_engine):
    with pytest.raises(ValueError, match="tiny-llama's chat template does not support tool calling"):
        tiny_engine.generate(CHAT, tools=[WEATHER])
    with pytest.raises(ValueError, match="tools need a prompt of chat messages"):
        tool_engine.generate("plain text", tools=[WEATHER])
    assert tool_engine.supports_tools and not tiny_engine.supports_tools


def test_empty_prompts_raise_for_text_and_chat(tiny_engine):
    for prompt in (
        "",
        "  ",
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": ""}, {"role": "user", "content": " "}],
    ):
        with pytest.raises(ValueError, match="prompt is empty"):
            tiny_engine.generate(prompt)
    with pytest.raises(ValueError, match="messages\\[0\\] needs a string 'role'"):
        tiny_engine.generate([{"content": "hi"}])


LOOSE = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "n", "tags"],
}


@pytest.mark.parametrize("budget", [24, 33, 48])
def test_answers_the_budget_would_cut_are_closed_in_time(tiny_engine, budget):
    """Unbounded strings and numbers: the random model alone runs to the budget; the answer still parses."""
    result = tiny_engine.generate(CHAT, json_schema=LOOSE, max_new_tokens=budget)
    assert result.stats.generated_tokens <= budget and result.stats.finish_reason == "length"
    jsonschema.validate(json.loads(result.text), LOOSE)


def test_answers_that_fit_are_not_changed_by_the_budget(tiny_engine):
    roomy = tiny_engine.generate(CHAT, json_schema=SCHEMA, max_new_tokens=200)
    tight = tiny_engine.generate(CHAT, json_schema=SCHEMA, max_new_tokens=len(roomy.token_ids))
    assert tight.token_ids == roomy.token_ids and tight.stats.finish_reason == "stop"


PATTERNS = ["^[a-z]+$", "(a+)+$", "^[A-Z]{2}-[0-9]{3}$", "^(foo|ba+r)+x$"]
FORMATS = ["email", "date", "date-time", "time", "uuid", "ipv4", "ipv6", "uri", "hostname"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random schema of what the grammar enforces: strings with lengths, patterns and formats, bounded numbers,
    enums, arrays with lengths, objects with required and optional properties, anyOf, and recursion."""
    kinds = ["string", "pattern", "format", "integer", "number", "boolean", "enum"]
    kind = rng.choice(kinds + ["array", "object", "object", "anyOf"] * (depth < 2) + ["tree"] * (depth == 0))
    if kind == "string":
        low = rng.choice([0, 0, 3, 12])
        return {"type": "string", "minLength": low, **({"maxLength": low + 8} if rng.random() < 0.3 else {})}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind in ("integer", "number"):
        low = rng.choice([-1000, 0, 100, 12345])
        return {"type": kind, "minimum": low, **({"maximum": low + 50} if rng.random() < 0.5 else {})}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "a long value", 7, None, "été"], 3)}
    if kind == "array":
        low = rng.choice([0, 1, 3])
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low, "maxItems": low + 4}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "tree":
        kids = {"type": "array", "items": {"$ref": "#/$defs/node"}}
        node = {"type": "object", "properties": {"v": random_schema(rng, 2), "kids": kids}}
        node["required"] = rng.sample(["v", "kids"], rng.randint(0, 2))
        return {"$defs": {"node": node}, "$ref": "#/$defs/node"}
    names = rng.sample(["name", "age", "tags", "when", "id", "note"], rng.randint(1, 4))
    properties = {name: random_schema(rng, depth + 1) for name in names}
    return {"type": "object", "properties": properties, "required": rng.sample(names, rng.randint(0, len(names)))}


@pytest.mark.parametrize("seed", range(96))
def test_constrained_answers_always_parse_or_say_the_budget_is_too_small(tiny_engine, seed):
    """Random schemas and budgets of 16-128 tokens, greedy and sampled from a random model (which wanders far more
    than a trained one): every answer is complete, valid JSON the schema accepts, or the request says up front
    that no answer fits its budget."""
    rng = random.Random(seed)
    schema, budget = random_schema(rng), rng.randint(16, 128)
    sampling = {"temperature": 1.0, "seed": seed} if seed % 2 else {}
    try:
        result = tiny_engine.generate(CHAT, json_schema=schema, max_new_tokens=budget, **sampling)
    except ValueError as exc:
        assert f"no constrained answer of at most max_new_tokens={budget} tokens" in str(exc)
        return
    assert result.stats.generated_tokens <= budget
    jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.slow
def test_the_default_models_answers_close_in_time_and_fit_unchanged(default_engine):
    """What a small model loops in (patterns, formats, recursion, arrays of strings) closes within the budget, and
    an answer that fits is the same at every budget it fits in."""
    ask = [{"role": "user", "content": "Give me a person as JSON: name Ada, pets a cat and a dog."}]
    node = {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}, "v": {"type": "integer"}}}
    pets = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "pets": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "pets"],
    }
    for schema, budget in [
        ({"type": "string", "pattern": "(a+)+$"}, 24),
        ({"type": "string", "format": "email"}, 24),
        ({"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}}}, 24),
        ({"$defs": {"node": node}, "$ref": "#/$defs/node"}, 24),
        (pets, 16),
    ]:
        result = default_engine.generate(ask, json_schema=schema, max_new_tokens=budget)
        assert result.stats.generated_tokens <= budget
        jsonschema.validate(json.loads(result.text), schema)
    fits = [default_engine.generate(ask, json_schema=pets, max_new_tokens=n).text for n in (32, 64)]
    assert fits[0] == fits[1] and json.loads(fits[0])["pets"]
    with pytest.raises(ValueError, match=r"max_new_tokens=8 tokens was found \(the shortest found takes \d+\)"):
        default_engine.generate(ask, tools=[WEATHER], tool_choice="any", max_new_tokens=8)
