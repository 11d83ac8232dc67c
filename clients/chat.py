"""Chat completion with the openai SDK (pip install openai).

    python clients/chat.py "What is the capital of France?"

QUANTSERVE_BASE_URL (default http://127.0.0.1:8000) and QUANTSERVE_API_KEY (if the server has
keys) say where to go; the model is the server's first.
"""

import os
import sys

from openai import OpenAI

base = os.environ.get("QUANTSERVE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
client = OpenAI(base_url=base + "/v1", api_key=os.environ.get("QUANTSERVE_API_KEY", "unused"))
model = client.models.list().data[0].id
question = " ".join(sys.argv[1:]) or "What is the capital of France?"

reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are a concise assistant."},
              {"role": "user", "content": question}],
    max_tokens=64, temperature=0)
print(reply.choices[0].message.content)
print(f"[{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens, "
      f"finish_reason={reply.choices[0].finish_reason}]", file=sys.stderr)
