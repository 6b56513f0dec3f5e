#!/usr/bin/env bash
# Prometheus really scrapes a running catdog service: starts Debian's `prometheus` on
# 127.0.0.1 (free port, temp storage) with monitoring/prometheus.yml pointed at the
# service and alerts.yml loaded, waits for a scrape, and asks the query API for the
# request counter. Fails if the target is not up, the counter is missing, or a rule
# does not evaluate. Prometheus is stopped by its PID afterwards.
#
#   monitoring/scrape_check.sh [http://127.0.0.1:8000]      (make monitor-check URL=...)
set -euo pipefail
url=${1:-http://127.0.0.1:8000}
target=${url#*://}
target=${target%%/*}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The repository's config, aimed at this service and scraping every second so CI waits little.
# The service's API_TOKEN, when it has one, from the environment (as the compose service does).
sed -e "s/\"api:8000\"/\"$target\"/" -e "s/_interval: 15s/_interval: 1s/" \
  -e "s#credentials_file: .*#credentials_file: $work/api_token#" "$here/prometheus.yml" > "$work/prometheus.yml"
printf %s "${API_TOKEN:-}" > "$work/api_token"
cp "$here/alerts.yml" "$work/alerts.yml"
promtool check config "$work/prometheus.yml" > /dev/null

prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$port" > "$work/prometheus.log" 2>&1 &
pid=$!
api="http://127.0.0.1:$port/api/v1"

# query EXPR -> the result vector as "labels value" lines (empty when no series).
query() {
  curl -fsS "$api/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k not in ("__name__", "job", "instance"))
    print(labels or "-", r["value"][1])'
}

# Two scrapes: the first creates the counter series, the second sees /metrics counted too.
for _ in $(seq 60); do
  if [ "$(query 'up{job="catdog"}' 2> /dev/null)" = "- 1" ] &&
     [ -n "$(query 'catdog_requests_total{endpoint="/metrics"}' 2> /dev/null)" ]; then
    break
  fi
  kill -0 "$pid" 2> /dev/null || { cat "$work/prometheus.log"; echo "FAIL: prometheus exited"; exit 1; }
  sleep 0.5
done

echo "prometheus 127.0.0.1:$port scraping $target:"
echo "  up: $(query 'up{job="catdog"}')"
counter=$(query 'sum by (endpoint, status) (catdog_requests_total)')
if [ -z "$counter" ]; then
  echo "FAIL: no catdog_requests_total series after 30 s"
  curl -fsS "$api/targets" || true
  exit 1
fi
echo "  catdog_requests_total by endpoint, status:"
sed 's/^/    /' <<< "$counter"
echo "  model: $(query 'catdog_model_info')"
echo "  live accuracy: $(query 'catdog_live_accuracy' | cut -d' ' -f2) over $(query 'catdog_live_accuracy_samples' | cut -d' ' -f2) predictions with feedback"

# Every alert rule must evaluate without error against the real series.
curl -fsS "$api/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
bad = [r["name"] for r in rules if r.get("health") not in ("ok", "unknown")]
firing = [r["name"] for r in rules if r.get("state") == "firing"]
print(f"  alert rules: {len(rules)} loaded, unhealthy {bad or None}, firing {firing or None}")
sys.exit(1 if bad or not rules else 0)'
echo "OK: prometheus scrapes the service"
