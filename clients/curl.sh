#!/usr/bin/env bash
# The API with curl: models, a chat completion, a streamed completion, health and metrics.
#   QUANTSERVE_BASE_URL=http://127.0.0.1:8000 QUANTSERVE_API_KEY=... bash clients/curl.sh
set -euo pipefail
BASE="${QUANTSERVE_BASE_URL:-http://127.0.0.1:8000}"
AUTH=()
if [ -n "${QUANTSERVE_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer ${QUANTSERVE_API_KEY}"); fi

echo "== GET /v1/models"
curl -sS --fail-with-body "${AUTH[@]}" "$BASE/v1/models"
MODEL=$(curl -sS "${AUTH[@]}" "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

echo; echo "== POST /v1/chat/completions"
curl -sS --fail-with-body "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],
  \"max_tokens\": 32, \"temperature\": 0}"

echo; echo "== POST /v1/completions (stream)"
curl -sS -N --fail-with-body "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"Once upon a time\", \"max_tokens\": 16, \"temperature\": 0,
  \"stream\": true, \"stream_options\": {\"include_usage\": true}}"

echo "== GET /health, /ready"
curl -sS --fail-with-body "$BASE/health"; echo
curl -sS --fail-with-body "$BASE/ready"; echo

echo "== GET /metrics (a few of the quantserve_ series)"
METRICS=$(curl -sS --fail-with-body "${AUTH[@]}" "$BASE/metrics")
grep -E '^quantserve_(generation_tokens_total|time_to_first_token_seconds_count|kv_cache_usage_ratio|quantization_info|kernel_backend_layers|self_check_status)' <<<"$METRICS"
