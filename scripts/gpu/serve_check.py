"""Checks a running weft server against `weft-run generate --prompts` output, with the official
openai client where it can be imported: each greedy completion (non-streaming, concurrent) and
each streamed one must equal the engine's text for the same prompt, and log-probabilities and
bad requests must come back in the API's shape. Prints one summary line per check, prefixed
`serve:`; exits non-zero if any failed.

usage: python3 serve_check.py BASE_URL EXPECTED.jsonl MAX_TOKENS
"""
import json
import sys
import threading
import urllib.error
import urllib.request

base, expected_path, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
expected = [json.loads(line) for line in open(expected_path)]
failed = []


def note(ok, what):
    print(f"serve: {'ok' if ok else 'FAIL'}: {what}", flush=True)
    if not ok:
        failed.append(what)


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


try:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    note(True, f"openai {openai.__version__} lists model {model}")
except Exception as e:  # the client is optional: the HTTP checks below still run
    client = None
    note(False, f"the openai client could not be used: {e!r}")

# Every prompt at once, so the server batches them.
texts = [None] * len(expected)


def complete(i):
    p = expected[i]["prompt"]
    if client is not None:
        r = client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
        texts[i] = r.choices[0].text
    else:
        texts[i] = post("/v1/completions", {"prompt": p, "max_tokens": max_tokens, "temperature": 0})[1]["choices"][0]["text"]


threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(expected))]
[t.start() for t in threads]
[t.join() for t in threads]
same = sum(t == e["text"] for t, e in zip(texts, expected))
note(same == len(expected), f"{same}/{len(expected)} concurrent greedy completions equal the engine's text")
for t, e in zip(texts, expected):
    if t != e["text"]:
        print(f"  server {t!r}\n  engine {e['text']!r}")

if client is not None:
    same = 0
    for e in expected:
        parts = [c.choices[0].text for c in client.completions.create(
            model=model, prompt=e["prompt"], max_tokens=max_tokens, temperature=0, stream=True)]
        same += "".join(parts) == e["text"]
    note(same == len(expected), f"{same}/{len(expected)} streamed completions (openai client) equal the engine's text")
    r = client.completions.create(model=model, prompt=expected[0]["prompt"], max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ok = len(lp.token_logprobs) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    ok = ok and all(abs(max(t.values()) - l) < 1e-6 for t, l in zip(lp.top_logprobs, lp.token_logprobs))
    note(ok, "greedy tokens' log-probabilities are their top alternatives' (logprobs=3)")
    try:
        client.completions.create(model=model, prompt=expected[0]["prompt"], max_tokens=5, temperature=-1)
        note(False, "a negative temperature was accepted")
    except openai.BadRequestError as e:
        note(True, f"a negative temperature: 400 ({e.body.get('message', '')[:60] if isinstance(e.body, dict) else ''})")

# echo with logprobs, as lm-evaluation-harness scores: every prompt token after the first.
ids = [[5, 17, 300, 41, 9, 77, 2], [8, 8, 101]]
status, body = post("/v1/completions", {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0})
ok = status == 200
for i, p in enumerate(ids):
    lp = body["choices"][i]["logprobs"] if ok else None
    ok = ok and lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(p) + 1
    ok = ok and all(x <= 0 and max(t.values()) >= x for x, t in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
note(ok, f"echo with logprobs scores every prompt token: {status}")

status, body = post("/v1/completions", {"prompt": [1, 2], "max_tokens": 1, "frobnicate": 1})
note(status == 400 and "error" in body, f"an unknown field: {status}")
with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
    live = [l for l in r.read().decode().splitlines() if l.startswith("weft_live_slots ")]
note(live == ["weft_live_slots 0"], f"after the checks: {live}")
sys.exit(1 if failed else 0)
