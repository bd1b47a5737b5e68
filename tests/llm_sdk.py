"""Cases for tests/llm.rs: the official `openai` and `anthropic` SDKs against an LLM API
of Tollgate. BASE is the API's URL (http://host:port/llm), KEY an API key. Each case
asserts what it checks and prints what the Rust side checks further."""

import json
import os
import sys
import time

import anthropic
import openai

try:  # the SDKs' HTTP client: httpx, or its successor httpx2 in newer releases
    import httpx
except ImportError:
    import httpx2 as httpx

BASE = os.environ["BASE"]
KEY = os.environ["KEY"]
oai = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0)
ant = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)
CHAT_MODELS = os.environ.get("MODELS", "gpt,azure-gpt,claude,gemini").split(",")
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
ATOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
           "input_schema": t["function"]["parameters"]} for t in TOOLS]


def raw_stream(path, body, headers=None):
    """The raw SSE text of a streamed answer."""
    h = {"authorization": "Bearer " + KEY}
    h.update(headers or {})
    with httpx.stream("POST", BASE + path, json=body, headers=h, timeout=30) as r:
        assert r.status_code == 200, (r.status_code, r.read())
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        assert r.headers.get("x-accel-buffering") == "no", r.headers
        return "".join(r.iter_text())


def chat():
    for model in CHAT_MODELS:
        r = oai.chat.completions.create(model=model, messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "hello there"}])
        assert r.choices[0].message.content == "You said: hello there", (model, r)
        assert r.choices[0].finish_reason == "stop", (model, r)
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 4, (model, r.usage)
        # max_tokens cuts the answer: finish_reason length, whatever the provider says.
        r = oai.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "one two three"}])
        assert r.choices[0].finish_reason == "length", (model, r)
        # Streams, with usage asked for and not.
        chunks = list(oai.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "a b c"}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "You said: a b c", (model, text)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5, (model, chunks[-1])
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"], model
        raw = raw_stream("/v1/chat/completions", {"model": model, "stream": True, "messages": [{"role": "user", "content": "x y"}]})
        assert '"usage"' not in raw, (model, "usage in a stream that did not ask for it", raw)
        assert raw.rstrip().endswith("data: [DONE]"), (model, raw[-200:])
        # Parallel tool calls, whole and streamed.
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "weather and time?"}], tools=TOOLS)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls", (model, r)
        assert [c.function.name for c in calls] == ["get_weather", "get_time"], (model, calls)
        assert json.loads(calls[0].function.arguments) == {"city": "demo"}, (model, calls)
        assert len({c.id for c in calls}) == 2, (model, "tool call ids are distinct", calls)
        streamed = {}
        for c in oai.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "w?"}], tools=TOOLS):
            for t in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                s = streamed.setdefault(t.index, {"id": None, "name": "", "args": ""})
                s["id"] = s["id"] or t.id
                s["name"] += (t.function.name or "") if t.function else ""
                s["args"] += (t.function.arguments or "") if t.function else ""
        assert sorted(streamed) == [0, 1], (model, streamed)
        assert streamed[0]["name"] == "get_weather" and json.loads(streamed[0]["args"]) == {"city": "demo"}, (model, streamed)
        assert streamed[1]["name"] == "get_time" and json.loads(streamed[1]["args"]) == {"tz": "demo"}, (model, streamed)
        # A named tool, and none.
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "t"}], tools=TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"], (model, r)
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "t"}], tools=TOOLS, tool_choice="none")
        assert r.choices[0].message.tool_calls in (None, []), (model, r)
        # The result goes back: the model sees it.
        first = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "w?"}], tools=TOOLS[:1])
        call = first.choices[0].message.tool_calls[0]
        r = oai.chat.completions.create(model=model, tools=TOOLS[:1], messages=[
            {"role": "user", "content": "w?"}, first.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        assert "sunny" in r.choices[0].message.content, (model, r)
        # An image (base64 and URL) goes through.
        img = "data:image/png;base64,iVBORw0KGgo="
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": img}}]}])
        assert r.choices[0].message.content.startswith("You said:"), (model, r)
        print("chat", model, "ok")


def messages():
    for model in CHAT_MODELS:
        m = ant.messages.create(model=model, max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hi you"}])
        assert m.content[0].text == "You said: hi you" and m.stop_reason == "end_turn", (model, m)
        assert m.usage.input_tokens > 0 and m.usage.output_tokens == 4, (model, m.usage)
        m = ant.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi you"}])
        assert m.stop_reason == "max_tokens", (model, m)
        with ant.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "stream this"}]) as s:
            texts = list(s.text_stream)
            final = s.get_final_message()
        assert "".join(texts) == "You said: stream this", (model, texts)
        assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0, (model, final.usage)
        assert final.stop_reason == "end_turn", (model, final)
        # Parallel tool use, streamed, and the result back.
        with ant.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "w?"}], tools=ATOOLS) as s:
            final = s.get_final_message()
        uses = [b for b in final.content if b.type == "tool_use"]
        assert [u.name for u in uses] == ["get_weather", "get_time"], (model, final.content)
        assert uses[0].input == {"city": "demo"} and final.stop_reason == "tool_use", (model, final)
        m = ant.messages.create(model=model, max_tokens=64, tools=ATOOLS[:1], messages=[
            {"role": "user", "content": "w?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": {"city": "demo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "rainy"}]}])
        assert "rainy" in m.content[0].text, (model, m)
        m = ant.messages.create(model=model, max_tokens=64, tools=ATOOLS, tool_choice={"type": "tool", "name": "get_time"},
                                messages=[{"role": "user", "content": "t"}])
        assert [b.name for b in m.content if b.type == "tool_use"] == ["get_time"], (model, m)
        m = ant.messages.create(model=model, max_tokens=64, tools=ATOOLS, tool_choice={"type": "none"},
                                messages=[{"role": "user", "content": "t"}])
        assert all(b.type == "text" for b in m.content), (model, m)
        n = ant.messages.count_tokens(model=model, messages=[{"role": "user", "content": "count these words"}])
        assert n.input_tokens > 0, (model, n)
        print("messages", model, "ok")


def embeddings_models_responses():
    for model in ["embed", "gembed"]:
        e = oai.embeddings.create(model=model, input=["first text", "second"])
        assert len(e.data) == 2 and len(e.data[0].embedding) == 8, (model, e)
        assert e.usage.prompt_tokens > 0, (model, e.usage)
    ids = sorted(m.id for m in oai.models.list())
    assert "gpt" in ids and "claude" in ids and "embed" in ids, ids
    assert sorted(m.id for m in ant.models.list()) == ids
    for model in CHAT_MODELS:
        r = oai.responses.create(model=model, input="hello responses", instructions="brief", store=False)
        assert r.output_text == "You said: hello responses" and r.status == "completed", (model, r)
        assert r.usage.output_tokens == 4, (model, r.usage)
        with oai.responses.stream(model=model, input=[{"role": "user", "content": "stream me"}], store=False) as s:
            deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
            final = s.get_final_response()
        assert "".join(deltas) == "You said: stream me" == final.output_text, (model, deltas)
        tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS]
        with oai.responses.stream(model=model, input="w?", tools=tools, store=False) as s:
            final = s.get_final_response()
        calls = [o for o in final.output if o.type == "function_call"]
        assert [c.name for c in calls] == ["get_weather", "get_time"], (model, final.output)
        assert json.loads(calls[0].arguments) == {"city": "demo"}, (model, calls)
        r = oai.responses.create(model=model, tools=tools[:1], store=False, input=[
            {"role": "user", "content": "w?"},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "foggy"}])
        assert "foggy" in r.output_text, (model, r)
        print("responses", model, "ok")


def expect(exc, fn, status=None):
    try:
        fn()
    except exc as e:
        if status is not None:
            assert e.status_code == status, (exc, e.status_code, e)
        return e
    raise AssertionError(f"{exc.__name__} was not raised")


def errors():
    bad_o = openai.OpenAI(base_url=BASE + "/v1", api_key="tgk_nope_nope", max_retries=0)
    bad_a = anthropic.Anthropic(base_url=BASE, api_key="tgk_nope_nope", max_retries=0)
    msg = [{"role": "user", "content": "x"}]
    expect(openai.AuthenticationError, lambda: bad_o.chat.completions.create(model="gpt", messages=msg), 401)
    expect(anthropic.AuthenticationError, lambda: bad_a.messages.create(model="gpt", max_tokens=5, messages=msg), 401)
    e = expect(openai.NotFoundError, lambda: oai.chat.completions.create(model="no-such-model", messages=msg), 404)
    assert e.code == "model_not_found", e.body
    expect(anthropic.NotFoundError, lambda: ant.messages.create(model="no-such-model", max_tokens=5, messages=msg), 404)
    e = expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="claude", messages=msg, logprobs=True), 400)
    assert "logprobs" in str(e), e
    expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="gpt", messages=[]), 400)
    bad_tool = [{"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}]
    expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="gpt", messages=msg, tools=bad_tool), 400)
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="gpt", messages=msg, tools=bad_schema), 400)
    expect(anthropic.BadRequestError, lambda: ant.messages.create(model="gpt", max_tokens=5, messages=[]), 400)
    r = httpx.post(BASE + "/v1/chat/completions", content=b"{not json", headers={"authorization": "Bearer " + KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(BASE + "/v1/messages", content=b"{not json", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error", r.text
    # A body over the node's limit: 413 in each dialect, read no further.
    huge = b'{"model":"gpt","messages":[{"role":"user","content":"' + b"x" * (11 * 1024 * 1024) + b'"}]}'
    r = httpx.post(BASE + "/v1/chat/completions", content=huge, headers={"authorization": "Bearer " + KEY}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(BASE + "/v1/messages", content=huge, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    # The prompt fits no deployment's window: refused before any call.
    long = " ".join(["word"] * 3000)
    e = expect(openai.BadRequestError, lambda: oai.chat.completions.create(model="small", messages=[{"role": "user", "content": long}]), 400)
    assert e.code == "context_length_exceeded", e.body
    # A provider that answers 429 with retry-after, no other deployment: RateLimitError.
    e = expect(openai.RateLimitError, lambda: oai.chat.completions.create(model="limited", messages=msg), 429)
    assert e.response.headers.get("retry-after") == "7", e.response.headers
    e = expect(anthropic.RateLimitError, lambda: ant.messages.create(model="limited", max_tokens=5, messages=msg), 429)
    # A provider that fails: a 5xx the SDKs raise as an APIStatusError.
    e = expect(openai.APIStatusError, lambda: oai.chat.completions.create(model="broken", messages=msg))
    assert e.status_code >= 500, e
    e = expect(anthropic.APIStatusError, lambda: ant.messages.create(model="broken", max_tokens=5, messages=msg))
    assert e.status_code >= 500, e
    # A key limited to some models: 403 for the others, and /v1/models lists only its own.
    limited = os.environ.get("LIMITED_KEY")
    if limited:
        lo = openai.OpenAI(base_url=BASE + "/v1", api_key=limited, max_retries=0)
        la = anthropic.Anthropic(base_url=BASE, api_key=limited, max_retries=0)
        expect(openai.PermissionDeniedError, lambda: lo.chat.completions.create(model="claude", messages=msg), 403)
        expect(anthropic.PermissionDeniedError, lambda: la.messages.create(model="claude", max_tokens=5, messages=msg), 403)
        assert [m.id for m in lo.models.list()] == ["gpt"], list(lo.models.list())
        assert lo.chat.completions.create(model="gpt", messages=msg).choices[0].message.content
    print("errors ok")


def stream_cut():
    """After its first token a stream that the provider cuts ends with an error the SDK
    raises, never a clean end."""
    model = os.environ["MODEL"]
    got = []
    e = expect(openai.APIError, lambda: [got.append(c) for c in oai.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": "one two three four five six"}])])
    assert got, "some chunks arrived before the cut"
    raw = raw_stream("/v1/chat/completions", {"model": model, "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]})
    assert "[DONE]" not in raw and '"error"' in raw, raw
    def consume():
        with ant.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "a b c d e f"}]) as s:
            for _ in s:
                pass
    expect(anthropic.APIStatusError, consume)
    raw = raw_stream("/v1/messages", {"model": model, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]},
                     {"anthropic-version": "2023-06-01"})
    assert "message_stop" not in raw and "event: error" in raw, raw
    print("stream_cut ok")


def disconnect():
    """Reads two chunks of a slow stream and leaves."""
    s = oai.chat.completions.create(model=os.environ["MODEL"], stream=True,
                                    messages=[{"role": "user", "content": " ".join(["w"] * 50)}])
    it = iter(s)
    next(it)
    next(it)
    s.close()
    print("left")


def fallback():
    """The model's first deployment fails in the way MODEL says; the answer comes from
    the next one."""
    model = os.environ["MODEL"]
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "fall back"}])
    assert r.choices[0].message.content == "You said: fall back", r
    print("model", r.model)
    chunks = list(oai.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "fall back"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: fall back", text
    print("stream model", chunks[-1].model)


def costs():
    """x-tollgate-cost (and a stream's final usage event) equal a hand computation from
    the usage the answer reports, at IN and OUT per 10^6 tokens and PER_1K per 1,000
    requests. Prints the sum, for the cost report."""
    from decimal import Decimal
    price_in = Decimal(os.environ["IN"]) / 10**6
    price_out = Decimal(os.environ["OUT"]) / 10**6
    per_request = Decimal(os.environ["PER_1K"]) / 1000
    total = Decimal(0)

    def check(tokens_in, tokens_out, got):
        want = tokens_in * price_in + tokens_out * price_out + per_request
        assert Decimal(got) == want, (got, want, tokens_in, tokens_out)
        return Decimal(got)

    msg = [{"role": "user", "content": "what does this cost"}]
    for model in CHAT_MODELS:
        raw = oai.chat.completions.with_raw_response.create(model=model, messages=msg)
        r = raw.parse()
        assert raw.headers["x-tollgate-cost-currency"] == "USD", raw.headers
        total += check(r.usage.prompt_tokens, r.usage.completion_tokens, raw.headers["x-tollgate-cost"])
        chunks = list(oai.chat.completions.create(model=model, messages=msg, stream=True,
                                                  stream_options={"include_usage": True}))
        last = chunks[-1]
        ext = (last.model_extra or {}).get("tollgate")
        assert ext, raw_stream("/v1/chat/completions", {"model": model, "stream": True, "messages": msg,
                                                        "stream_options": {"include_usage": True}})
        assert ext["currency"] == "USD", ext
        total += check(last.usage.prompt_tokens, last.usage.completion_tokens, ext["cost"])
    # Anthropic's dialect: the message_delta event carries it.
    tokens_in, ext = None, None
    for ev in ant.messages.create(model="claude", max_tokens=64, messages=msg, stream=True):
        if ev.type == "message_start":
            tokens_in = ev.message.usage.input_tokens
        if ev.type == "message_delta":
            ext = getattr(ev, "tollgate", None) or ev.model_extra.get("tollgate")
            tokens_out = ev.usage.output_tokens
    assert ext, "message_delta has no tollgate field"
    total += check(tokens_in, tokens_out, ext["cost"])
    print("costs total", total)


def budget():
    """402 before dispatch when the worst case does not fit; a stream cut where the budget
    ends, with an error event the SDKs raise."""
    msg = [{"role": "user", "content": "hello"}]
    e = expect(openai.APIStatusError, lambda: oai.chat.completions.create(
        model="gpt", max_tokens=int(os.environ["BIG"]), messages=msg), 402)
    assert e.code == "insufficient_quota" and e.type == "insufficient_quota", e.body
    e = expect(anthropic.APIStatusError, lambda: ant.messages.create(
        model="gpt", max_tokens=int(os.environ["BIG"]), messages=msg), 402)
    assert e.body["error"]["type"] == "billing_error", e.body
    got = []
    e = expect(openai.APIError, lambda: [got.append(c) for c in oai.chat.completions.create(
        model="long", stream=True, max_tokens=5000, messages=msg)])
    assert "budget" in str(e), e
    words = "".join(c.choices[0].delta.content or "" for c in got if c.choices).split()
    print("streamed words", len(words))
    # Spent: a stream cannot start either.
    e = expect(openai.APIStatusError, lambda: list(oai.chat.completions.create(
        model="long", stream=True, max_tokens=5000, messages=msg)), 402)
    print("budget ok")


def token_limit():
    """A token quota: requests fit while their worst case does, then 429 with retry-after
    and the RateLimit fields in each dialect, before any provider call."""
    msg = [{"role": "user", "content": "count me"}]
    for _ in range(2):
        r = oai.chat.completions.create(model="gpt", max_tokens=int(os.environ["FITS"]), messages=msg)
        assert r.choices[0].message.content
    e = expect(openai.RateLimitError, lambda: oai.chat.completions.create(
        model="gpt", max_tokens=int(os.environ["OVER"]), messages=msg), 429)
    h = e.response.headers
    # A window counter: the caller may try again when the hour's window ends.
    assert 1 <= int(h["retry-after"]) <= 3600, h
    assert h["ratelimit-policy"].startswith('"tpm";q='), h
    assert h["ratelimit"].startswith('"tpm";r=0;t='), h
    expect(anthropic.RateLimitError, lambda: ant.messages.create(
        model="gpt", max_tokens=int(os.environ["OVER"]), messages=msg), 429)
    e = expect(openai.RateLimitError, lambda: oai.chat.completions.create(
        model="gpt", max_tokens=100000, messages=msg), 429)
    assert "more than quota tpm allows" in str(e), e
    print("token_limit ok")


def prompts():
    """Prompt APIs through the SDK's own POST: variables in, the answer out as JSON (held
    to the output schema natively and by instruction), a bad variable's 400 naming it, and
    a stream when the caller accepts server-sent events."""
    p = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0)
    r = p.post("/greet", body={"name": "Ada"}, cast_to=object)
    assert r["object"] == "prompt.result" and r["prompt"] == "greet", r
    assert r["output"] == "You said: Greet Ada in English", r
    assert r["usage"]["prompt_tokens"] > 0, r
    for name in ["score", "score-gpt"]:
        r = p.post("/" + name, body={"text": "fine"}, cast_to=object)
        assert r["output"] == {"score": 1, "reason": "demo"}, (name, r)
    e = expect(openai.BadRequestError, lambda: p.post("/greet", body={"language": "French"}, cast_to=object), 400)
    assert e.param == "name" and e.code == "invalid_variable", e.body
    e = expect(openai.BadRequestError, lambda: p.post("/greet", body={"name": 5}, cast_to=object), 400)
    assert e.param == "name", e.body
    e = expect(openai.BadRequestError, lambda: p.post("/greet", body={"name": "x" * 41}, cast_to=object), 400)
    assert e.param == "name", e.body
    e = expect(openai.BadRequestError, lambda: p.post("/greet", body=["Ada"], cast_to=object), 400)
    with httpx.stream("POST", BASE + "/greet", json={"name": "Bo"}, timeout=30,
                      headers={"authorization": "Bearer " + KEY, "accept": "text/event-stream"}) as r:
        assert r.status_code == 200, r.read()
        text = "".join(r.iter_text())
    assert "chat.completion.chunk" in text and "data: [DONE]" in text and " Bo" in text, text
    print("prompts ok")


def prompt_versions():
    """Calls the greet prompt N times; prints how many answers each template gave."""
    p = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0)
    counts = {}
    for _ in range(int(os.environ["N"])):
        out = p.post("/greet", body={"name": "Ada"}, cast_to=object)["output"]
        counts[out] = counts.get(out, 0) + 1
    print(json.dumps(counts))


def cache():
    """The response cache: a deterministic request misses then hits (whole and streamed,
    in both dialects); other temperatures and Cache-Control: no-cache bypass it."""
    msg = [{"role": "user", "content": "cache me please"}]

    def whole(**kw):
        raw = oai.chat.completions.with_raw_response.create(model="gpt", messages=msg, **kw)
        return raw.headers.get("x-tollgate-cache"), raw.headers.get("x-tollgate-cost"), raw.parse()

    def streamed(**kw):
        raw = oai.chat.completions.with_raw_response.create(model="gpt", messages=msg, stream=True, **kw)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return raw.headers.get("x-tollgate-cache"), text

    state, _, first = whole(temperature=0)
    assert state == "miss", state
    state, cost, again = whole(temperature=0)
    assert state == "hit" and cost == os.environ["CACHED_COST"], (state, cost)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.id == first.id, "the same answer, replayed"
    state, text = streamed(temperature=0)
    assert state == "miss", state
    state, replay = streamed(temperature=0)
    assert state == "hit" and replay == text == "You said: cache me please", (state, replay, text)
    assert whole(temperature=0.7)[0] == "bypass"
    assert whole(temperature=0, extra_headers={"cache-control": "no-cache"})[0] == "bypass"
    a1 = ant.messages.with_raw_response.create(model="claude", max_tokens=64, messages=msg, extra_body={"temperature": 0})
    a2 = ant.messages.with_raw_response.create(model="claude", max_tokens=64, messages=msg, extra_body={"temperature": 0})
    assert a1.headers["x-tollgate-cache"] == "miss" and a2.headers["x-tollgate-cache"] == "hit"
    assert a1.parse().content[0].text == a2.parse().content[0].text
    print("cache ok")


def guard():
    """The prompt guard: emails and phone numbers masked before the provider sees them;
    secrets and card numbers refused with a 400 that names the class, in both dialects."""
    def msg(t):
        return [{"role": "user", "content": t}]
    r = oai.chat.completions.create(model="gpt", messages=msg("mail ada@example.com or call +44 20 7946 0958"))
    assert r.choices[0].message.content == "You said: mail [EMAIL] or call [PHONE]", r
    e = expect(openai.BadRequestError, lambda: oai.chat.completions.create(
        model="gpt", messages=msg("why does sk-proj-abcdefghijklmnopqrstuvwxyz0123 fail?")), 400)
    assert e.code == "sensitive_data" and e.param == "secret", e.body
    e = expect(openai.BadRequestError, lambda: oai.chat.completions.create(
        model="gpt", messages=msg("charge 4111 1111 1111 1111 please")), 400)
    assert e.param == "card" and "card number" in e.message, e.body
    e = expect(anthropic.BadRequestError, lambda: ant.messages.create(
        model="claude", max_tokens=20, messages=msg("token ghp_" + "a" * 36)), 400)
    assert e.body["error"]["type"] == "invalid_request_error" and "secret" in e.body["error"]["message"], e.body
    print("guard ok")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
