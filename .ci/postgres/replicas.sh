#!/usr/bin/env bash
# Two api containers of one image on one PostgreSQL. docker-compose.yml's `postgres` profile
# (podman-compose) runs the database and api 1, with a host config of its own (DATABASE_URL,
# API_TOKEN); api 2 is the same image on the same Compose network and env file. A prediction
# made on api 1 takes its feedback on api 2, both report the same feedback count and
# live-accuracy sample count, and smoke.sh passes against each. The database is this
# folder's stand-in for the official image (Dockerfile). .ci/run runs it after the
# Kubernetes step; on its own, from the project root:
#   eval "$(../shared/tools/container-sandbox.sh env)"
#   .ci/postgres/replicas.sh IMAGE:TAG       # ports PORT1 (8001) and PORT2 (8002)
#   .ci/postgres/replicas.sh down            # remove what a killed run left
set -euo pipefail
cd "$(dirname "$0")/../.."

project=catdog-pgci  # not the deploy's project (catdog): a deployed service is left alone
api2="$project-api-2"
pg_image=localhost/catdog-ci-postgres:15
port1="${PORT1:-8001}" port2="${PORT2:-8002}"
photo="${SMOKE_CAT_PHOTO:-../shared/datasets/dogs-vs-cats-3k/cat.3.jpg}"
compose=("$PWD/.venv/bin/podman-compose" -p "$project" --profile postgres)
log() { echo "replicas: $*"; }
fail() { echo "replicas: FAIL: $*" >&2; exit 1; }

# Everything this script starts carries the project's name; no compose file needed.
down() {
  podman rm -f -v "$api2" >/dev/null 2>&1 || true
  podman ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r podman rm -f -v >/dev/null 2>&1 || true
  podman pod rm -f "pod_$project" >/dev/null 2>&1 || true
  podman volume ls -q | grep "^${project}_" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  podman network rm -f "${project}_default" >/dev/null 2>&1 || true
}
if [ "${1:-}" = down ]; then down; exit 0; fi
image="${1:?usage: $0 IMAGE:TAG | down}"

work="$(mktemp -d)"
cleanup() { down; rm -rf "$work"; }
trap cleanup EXIT
down  # a killed earlier run

# shellcheck disable=SC2086  # the sandbox's flags are meant to split
podman build $PODMAN_BUILD_FLAGS --quiet -t "$pg_image" .ci/postgres >/dev/null
log "database image $pg_image (Debian's $(podman run --rm --entrypoint postgres "$pg_image" --version))"

# The compose file as it is, with a host config of this run's (the machine's stays out of it):
# the file an operator writes from catdog.env.example. smoke.sh then expects PostgreSQL and sends the token.
cp docker-compose.yml "$work/"
password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" token="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
sed -e "s/^API_TOKEN=.*/API_TOKEN=$token/" -e "s/change-me/$password/g" catdog.env.example >"$work/catdog.env"
export CATDOG_ENV_FILE="$work/catdog.env"
export IMAGE="${image%:*}" TAG="${image##*:}" PORT="$port1" POSTGRES_IMAGE="$pg_image"
t0=$SECONDS
(cd "$work" && "${compose[@]}" up -d >/dev/null 2>"$work/up.log") || { cat "$work/up.log" >&2; fail "compose up"; }
pg="$(podman ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=postgres)"
[ -n "$pg" ] || fail "no postgres container after compose up"
# Podman runs no healthcheck timers without systemd: run the compose file's own check here.
until podman healthcheck run "$pg" >/dev/null 2>&1; do
  [ $((SECONDS - t0)) -lt 60 ] || { podman logs --tail 20 "$pg" >&2; fail "postgres not healthy after 60 s"; }
  sleep 0.5
done
log "postgres healthy (its compose healthcheck) $((SECONDS - t0)) s after compose up"

podman run -d --name "$api2" --network "${project}_default" --env-file "$CATDOG_ENV_FILE" \
  --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -p "127.0.0.1:$port2:8000" "$image" >/dev/null
wait_health() {
  for _ in $(seq 600); do curl -fs -o /dev/null --max-time 2 "$1/health" && return; sleep 0.1; done
  podman ps -a --filter "label=com.docker.compose.project=$project" >&2
  podman logs --tail 20 "$2" >&2 || true
  fail "no /health 200 from $1 after 60 s"
}
url1="http://127.0.0.1:$port1" url2="http://127.0.0.1:$port2"
api1="$(podman ps -q --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=api)"
wait_health "$url1" "$api1"
wait_health "$url2" "$api2"
for c in "$api1" "$api2"; do
  # grep reads a variable, not a pipe: under pipefail, grep -q exiting at its first match would
  # fail the pipeline through podman logs' SIGPIPE.
  grep -q '"store": *"postgresql"' <<<"$(podman logs "$c" 2>&1)" || fail "$c does not log store postgresql: $(podman logs --tail 5 "$c" 2>&1)"
done
log "both apis ready on PostgreSQL $((SECONDS - t0)) s after compose up (api 1 restarts: $(podman inspect -f '{{.RestartCount}}' "$api1"))"

# json URL EXPR [curl args]: GET (or POST with args) URL, require 200, print EXPR of the body as r
json() {
  local url="$1" expr="$2" status
  shift 2
  status="$(curl -sS -o "$work/body" -w '%{http_code}' --max-time 30 -H "Authorization: Bearer $token" "$@" "$url")" \
    || fail "no answer from $url"
  [ "$status" = 200 ] || fail "$url answered $status: $(head -c 300 "$work/body")"
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$work/body" "$expr"
}
id="$(json "$url1/predict" 'r["prediction_id"]' -F "file=@$photo")"
answer="$(json "$url2/feedback" 'r["recorded"], r["predicted"]' -H 'Content-Type: application/json' \
  -d "{\"prediction_id\": \"$id\", \"label\": \"cat\"}")"
log "prediction $id made on api 1, its feedback recorded on api 2 (recorded, predicted: $answer)"
count1="$(json "$url1/stats" 'r["feedback_count"]')"
count2="$(json "$url2/stats" 'r["feedback_count"]')"
if [ "$count1" != "$count2" ] || [ "$count1" -lt 1 ]; then fail "/stats feedback_count: api 1 $count1, api 2 $count2"; fi
samples() { curl -fsS --max-time 10 -H "Authorization: Bearer $token" "$1/metrics" | awk '$1 == "catdog_live_accuracy_samples" {print $2}'; }
s1="$(samples "$url1")" s2="$(samples "$url2")"
if [ -z "$s1" ] || [ "$s1" != "$s2" ]; then fail "catdog_live_accuracy_samples: api 1 '$s1', api 2 '$s2'"; fi
log "feedback_count $count1 on both, catdog_live_accuracy_samples $s1 on both"

make --no-print-directory smoke URL="$url1"
make --no-print-directory smoke URL="$url2"
log "PASS: two apis on one PostgreSQL ($((SECONDS - t0)) s after compose up)"
