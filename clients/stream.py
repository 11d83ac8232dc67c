"""Streaming chat with the openai SDK: tokens are printed as they arrive, usage at the end.

    python clients/stream.py "Write a haiku about GPUs."

QUANTSERVE_BASE_URL (default http://127.0.0.1:8000) and QUANTSERVE_API_KEY as in chat.py.
"""

import os
import sys
import time

from openai import OpenAI

base = os.environ.get("QUANTSERVE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
client = OpenAI(base_url=base + "/v1", api_key=os.environ.get("QUANTSERVE_API_KEY", "unused"))
model = client.models.list().data[0].id
prompt = " ".join(sys.argv[1:]) or "Write a haiku about GPUs."

start = time.perf_counter()
first = None
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0.7,
    stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        first = first or time.perf_counter()
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:  # the last chunk: no choices, the token counts
        total = time.perf_counter() - start
        ttft = (first or time.perf_counter()) - start
        print(f"\n[{chunk.usage.completion_tokens} tokens in {total:.2f}s, first after "
              f"{ttft * 1e3:.0f} ms]", file=sys.stderr)
