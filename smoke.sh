#!/usr/bin/env bash
# Smoke test of a running catdog service; `make deploy` rolls back when it fails.
#   ./smoke.sh URL [IMAGES_DIR]          known photos from the shared sample (default below)
#   ./smoke.sh URL CAT_PHOTO DOG_PHOTO   any two photos the model must get right
# Passes only when the service really works: /health says ok, a known cat and a known dog
# are predicted correctly with confidence >= MIN_CONFIDENCE, a corrupt upload gets a 4xx
# (not a 200, not a 5xx), and /metrics counts the predictions. Anything else exits 1.
# /health must name the store the host config asks for (CATDOG_ENV_FILE, default
# /etc/catdog/catdog.env when it exists; else this environment): postgresql when it sets
# DATABASE_URL, else sqlite. Its API_TOKEN (or this environment's) goes with every request.
set -euo pipefail

usage="usage: $0 URL [IMAGES_DIR | CAT_PHOTO DOG_PHOTO]"
url="${1:?$usage}"
url="${url%/}"
root="$(cd "$(dirname "$0")" && pwd)"
MIN_CONFIDENCE="${MIN_CONFIDENCE:-0.9}"
# Two photos of the shared 3k sample that the seeded split keeps in the held-out test split.
SMOKE_CAT="${SMOKE_CAT:-cat.3.jpg}"
SMOKE_DOG="${SMOKE_DOG:-dog.2.jpg}"

if [ $# -ge 3 ]; then
  cat_photo="$2" dog_photo="$3"
else
  dir="${2:-$root/../shared/datasets/dogs-vs-cats-3k}"
  cat_photo="$dir/$SMOKE_CAT" dog_photo="$dir/$SMOKE_DOG"
fi

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

host_config="${CATDOG_ENV_FILE:-/etc/catdog/catdog.env}"
if [ -n "${CATDOG_ENV_FILE:-}" ] || [ -f "$host_config" ]; then
  [ -r "$host_config" ] || fail "cannot read the host config $host_config (CATDOG_ENV_FILE)"
  # setting NAME: the value of the file's last NAME=... line, without the quotes around it
  setting() {
    sed -n -E "s/^[[:space:]]*(export[[:space:]]+)?$1[[:space:]]*=[[:space:]]*//p" "$host_config" | tail -n 1 \
      | sed -E -e 's/[[:space:]]+$//' -e "s/^(['\"])(.*)\1$/\2/"
  }
  API_TOKEN="$(setting API_TOKEN)" DATABASE_URL="$(setting DATABASE_URL)"
else
  host_config="this environment"
fi
if [ -n "${DATABASE_URL:-}" ]; then
  expected_store="postgresql (it sets DATABASE_URL)"
else
  expected_store="sqlite (no DATABASE_URL)"
fi

body="$(mktemp)" corrupt="$(mktemp)"
trap 'rm -f "$body" "$corrupt"' EXIT

# call METHOD PATH [curl args...] -> HTTP status on stdout, response body in $body
call() {
  local method="$1" path="$2"
  shift 2
  # With API_TOKEN set (the service's), /metrics and the others that need it get it.
  curl -sS -o "$body" -w '%{http_code}' --max-time 30 -X "$method" \
    ${API_TOKEN:+-H "Authorization: Bearer $API_TOKEN"} "$@" "$url$path" \
    || fail "$method $path: no answer from $url"
}

# json EXPR: evaluate a Python expression over the response body as `r`
json() {
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$body" "$1" 2>/dev/null \
    || fail "expected JSON, got: $(head -c 300 "$body")"
}

status="$(call GET /health)"
[ "$status" = 200 ] || fail "/health answered $status: $(head -c 300 "$body")"
[ "$(json 'r.get("status")')" = ok ] || fail "/health is not ok: $(head -c 300 "$body")"
store="$(json 'r.get("store")')"
[ "$store" = "${expected_store%% *}" ] || fail "/health says store $store, but $host_config asks for $expected_store"
echo "smoke: /health ok, model $(json 'r.get("model_version")'), store $store"

# predict EXPECTED PHOTO: the right label with enough confidence
predict() {
  local expected="$1" photo="$2" status label confidence
  [ -f "$photo" ] || fail "no $expected photo at $photo"
  status="$(call POST /predict -F "file=@$photo")"
  [ "$status" = 200 ] || fail "/predict $photo answered $status: $(head -c 300 "$body")"
  label="$(json 'r["label"]')"
  confidence="$(json 'r["confidence"]')"
  [ "$label" = "$expected" ] || fail "$photo predicted '$label' (confidence $confidence), expected '$expected'"
  python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$confidence" "$MIN_CONFIDENCE" \
    || fail "$photo predicted $label with confidence $confidence < $MIN_CONFIDENCE"
  echo "smoke: $(basename "$photo") -> $label ($confidence)"
}
predict cat "$cat_photo"
predict dog "$dog_photo"

# Not a photo at all, and a real JPEG cut short: both are the client's fault (4xx).
printf 'this is not a photo' >"$corrupt"
status="$(call POST /predict -F "file=@$corrupt;filename=photo.jpg")"
[[ "$status" == 4?? ]] || fail "a non-image upload answered $status, expected 4xx: $(head -c 300 "$body")"
head -c "$(($(wc -c <"$cat_photo") / 2))" "$cat_photo" >"$corrupt"
status="$(call POST /predict -F "file=@$corrupt;filename=photo.jpg")"
[[ "$status" == 4?? ]] || fail "a truncated JPEG answered $status, expected 4xx: $(head -c 300 "$body")"
echo "smoke: corrupt uploads -> 4xx"

status="$(call GET /metrics)"
[ "$status" = 200 ] || fail "/metrics answered $status"
for label in cat dog; do
  count="$(awk -v m="catdog_predictions_total{label=\"$label\"}" '$1 == m {print $2}' "$body")"
  python3 -c 'import sys; sys.exit(not float(sys.argv[1] or 0) >= 1)' "$count" \
    || fail "/metrics: catdog_predictions_total{label=\"$label\"} is '${count}', expected >= 1"
done
echo "smoke: /metrics counts predictions"
echo "smoke: PASS $url"
