"""The `openai` Python package against `keel serve` (run by serve/tests/http.rs).

Usage: openai_client.py BASE_URL INFER_KEY REVIEW_KEY. Prints one JSON object of what the
client got: embeddings, a chat reply whole and streamed (with the usage), the model ids, and the
exception class each refusal raised.
"""
import json
import sys

import openai
from openai import OpenAI

base, key, reviewer = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
out = {}

texts = ["The quick brown fox jumps over the lazy dog.", "A cat sleeps."]
e = client.embeddings.create(model="minilm", input=texts)  # the package asks for base64
out["embeddings"] = [d.embedding for d in e.data]
out["embedding_tokens"] = e.usage.prompt_tokens

messages = [{"role": "user", "content": "Describe the sea in one sentence."}]
r = client.chat.completions.create(model="chat", messages=messages, max_tokens=16)
out["chat"] = {
    "text": r.choices[0].message.content,
    "finish": r.choices[0].finish_reason,
    "completion_tokens": r.usage.completion_tokens,
}

pieces, usage = [], None
stream = client.chat.completions.create(
    model="chat", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.completion_tokens
out["stream"] = {"text": "".join(pieces), "completion_tokens": usage}

out["models"] = sorted(m.id for m in client.models.list())


def raised(call):
    try:
        call()
    except openai.APIStatusError as ex:
        return {"class": type(ex).__name__, "status": ex.status_code, "code": (ex.body or {}).get("code")}
    return None


long = "Please tell me, in as much detail as you possibly can, everything that you happen to know about the long and winding history of the sea, its many ships, its sailors and its storms."
out["errors"] = {
    "unknown_model": raised(lambda: client.embeddings.create(model="nope", input="x")),
    "wrong_key": raised(lambda: OpenAI(base_url=base + "/v1", api_key="keel_wrong", max_retries=0).models.list()),
    "out_of_scope": raised(lambda: OpenAI(base_url=base + "/v1", api_key=reviewer, max_retries=0).models.list()),
    "contract": raised(
        lambda: client.chat.completions.create(model="chat", messages=[{"role": "user", "content": long}], max_tokens=8)
    ),
}
print(json.dumps(out))
