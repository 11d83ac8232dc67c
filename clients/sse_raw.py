"""Read the server's SSE stream by hand with httpx: what the SDKs do under the hood.

Each event is a line `data: <json>` followed by a blank line; lines starting with ':' are
keep-alive comments; the stream ends with `data: [DONE]`. An error after the stream has
started arrives as `data: {"error": {...}}` before [DONE].

    python clients/sse_raw.py "Once upon a time"
"""

import json
import os
import sys

import httpx

base = os.environ.get("QUANTSERVE_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
key = os.environ.get("QUANTSERVE_API_KEY")
headers = {"Authorization": f"Bearer {key}"} if key else {}
prompt = " ".join(sys.argv[1:]) or "Once upon a time"

with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
    model = client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            sys.exit(f"HTTP {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if not line or line.startswith(":"):
                continue  # event separator or keep-alive comment
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                print()
                break
            event = json.loads(data)
            if "error" in event:
                sys.exit(f"\nstream error: {event['error']['message']}")
            for choice in event.get("choices", []):
                print(choice["text"], end="", flush=True)
                if choice.get("finish_reason"):
                    print(f"\n[finish_reason={choice['finish_reason']}]", file=sys.stderr)
            if event.get("usage"):
                print(f"[usage {event['usage']}]", file=sys.stderr)
