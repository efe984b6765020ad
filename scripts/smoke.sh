#!/usr/bin/env bash
# Smoke tests for a running qwen-chat deployment, with curl. Prints what it checked; exits non-zero on
# any failure.
#
#   scripts/smoke.sh [URL]        URL defaults to http://127.0.0.1:8000
#   QWEN_CHAT_API_KEY=...         sent as "Authorization: Bearer ..." when the service requires a key
#   SMOKE_TIMEOUT=300             seconds allowed per request (a real card answers at ~14 tokens/s)
set -uo pipefail

url="${1:-http://127.0.0.1:8000}"
url="${url%/}"
timeout="${SMOKE_TIMEOUT:-300}"
auth=()
if [ -n "${QWEN_CHAT_API_KEY:-}" ]; then
  auth=(-H "Authorization: Bearer ${QWEN_CHAT_API_KEY%%,*}")
fi
failures=0
body=$(mktemp)
trap 'rm -f "$body"' EXIT

pass() { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s: %s\n' "$1" "$2"; failures=$((failures + 1)); }

# request NAME METHOD PATH [JSON]: the response body goes to $body, the status to $status
request() {
  local data=()
  if [ -n "${4:-}" ]; then data=(-H "Content-Type: application/json" --data-binary "$4"); fi
  status=$(curl -sS -N -m "$timeout" -o "$body" -w '%{http_code}' -X "$2" "${auth[@]}" "${data[@]}" "$url$3") \
    || { fail "$1" "curl could not reach $url$3"; return 1; }
}

# json_get EXPRESSION: evaluate a Python expression on the JSON body as `j`
json_get() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($1)" "$body" 2>/dev/null; }

echo "smoke tests against $url"

if request "health" GET /health; then
  if [ "$status" = 200 ] && [ "$(json_get 'j["status"]')" = ok ]; then
    pass "GET /health: ok ($(json_get '", ".join(f"{k}={v}" for k, v in j["details"].items() if k in ("model", "npu", "runner"))'))"
  else
    fail "GET /health" "HTTP $status $(head -c 300 "$body")"
  fi
fi

# The chat page for browsers; "Ollama is running" for everyone else (Ollama clients probe it).
page_status=$(curl -sS -m "$timeout" -o "$body" -w '%{http_code}' -H "Accept: text/html" "$url/") || page_status=000
if [ "$page_status" = 200 ] && grep -q 'src="[^"]*static/js/chat.js"' "$body"; then
  markdown="Markdown on"
  grep -q 'data-markdown="on"' "$body" || markdown="answers as plain text: run scripts/setup for its libraries"
  script_status=$(curl -sS -m "$timeout" -o /dev/null -w '%{http_code}' "$url/static/js/chat.js") || script_status=000
  if [ "$script_status" = 200 ]; then pass "GET / (browser): the chat page ($markdown)"; else fail "GET / (browser)" "its script: HTTP $script_status"; fi
else
  fail "GET / (browser)" "HTTP $page_status, no chat page"
fi
if request "root" GET /; then
  if [ "$status" = 200 ] && [ "$(cat "$body")" = "Ollama is running" ]; then pass "GET /: Ollama is running"; else fail "GET /" "HTTP $status $(head -c 100 "$body")"; fi
fi

model=""
if request "models" GET /v1/models; then
  model=$(json_get 'j["data"][0]["id"]')
  if [ "$status" = 200 ] && [ -n "$model" ]; then pass "GET /v1/models: $model"; else fail "GET /v1/models" "HTTP $status"; fi
fi
model="${model:-qwen2.5}"

chat='{"model": "'"$model"'", "max_tokens": 24, "messages": [{"role": "user", "content": "Say hello in five words."}]}'
if request "chat" POST /v1/chat/completions "$chat"; then
  content=$(json_get 'j["choices"][0]["message"]["content"]')
  usage=$(json_get 'j["usage"]["completion_tokens"]')
  if [ "$status" = 200 ] && [ -n "$content" ] && [ "${usage:-0}" -gt 0 ]; then
    pass "POST /v1/chat/completions: ${usage} tokens, \"${content:0:60}\""
  else
    fail "POST /v1/chat/completions" "HTTP $status $(head -c 300 "$body")"
  fi
fi

stream='{"model": "'"$model"'", "max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Count to three."}]}'
if request "stream" POST /v1/chat/completions "$stream"; then
  chunks=$(grep -c '^data: {' "$body")
  if [ "$status" = 200 ] && [ "$chunks" -ge 3 ] && grep -q '^data: \[DONE\]' "$body"; then
    pass "POST /v1/chat/completions (stream): $chunks chunks, then [DONE]"
  else
    fail "POST /v1/chat/completions (stream)" "HTTP $status, $chunks chunks"
  fi
fi

if request "ollama tags" GET /api/tags; then
  name=$(json_get 'j["models"][0]["name"]')
  if [ "$status" = 200 ] && [ -n "$name" ]; then pass "GET /api/tags: $name"; else fail "GET /api/tags" "HTTP $status"; fi
fi

ollama='{"model": "'"$model"'", "stream": false, "options": {"num_predict": 24}, "messages": [{"role": "user", "content": "Say hello."}]}'
if request "ollama chat" POST /api/chat "$ollama"; then
  content=$(json_get 'j["message"]["content"]')
  if [ "$status" = 200 ] && [ -n "$content" ] && [ "$(json_get 'j["done"]')" = True ]; then
    pass "POST /api/chat: $(json_get 'j["eval_count"]') tokens, \"${content:0:60}\""
  else
    fail "POST /api/chat" "HTTP $status $(head -c 300 "$body")"
  fi
fi

generate='{"model": "'"$model"'", "prompt": "Say hello.", "options": {"num_predict": 24}}'
if request "ollama generate" POST /api/generate "$generate"; then
  lines=$(grep -c '"done":' "$body")
  if [ "$status" = 200 ] && [ "$lines" -ge 2 ] && tail -n 1 "$body" | grep -q '"done":true'; then
    pass "POST /api/generate (stream): $lines lines, the last one done"
  else
    fail "POST /api/generate (stream)" "HTTP $status, $lines lines"
  fi
fi

if [ "$failures" -gt 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
