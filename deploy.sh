#!/usr/bin/env bash
# Deploy an image tag with Compose, gated by smoke.sh, rolling back when it fails.
#   ./deploy.sh TAG          pull IMAGE:TAG, `compose up`, wait for /health, run smoke.sh;
#                            on failure redeploy the last good tag, re-check it, exit 1
#   ./deploy.sh --rollback   redeploy the good tag before the current one
# Settings come from the environment (`make deploy` passes them): IMAGE, DOCKER, COMPOSE,
# URL, SMOKE_ARGS, HEALTH_TIMEOUT, DEPLOY_STATE, CATDOG_ENV_FILE. DEPLOY_STATE (default
# .deploy/good) lists the tags that passed smoke on this host, newest last: the host's state,
# not the project's, so it stays out of git (a CI runner keeps it outside the checkout, which
# gets cleaned). CATDOG_ENV_FILE (default /etc/catdog/catdog.env) is the host config that
# Compose gives the api and smoke.sh checks against (catdog.env.example): it must exist, outside
# the checkout, with no change-me left; CATDOG_ENV_FILE=/dev/null deploys without one (SQLite
# in the `feedback` volume, no token).
set -euo pipefail
env_file="${CATDOG_ENV_FILE:-/etc/catdog/catdog.env}"
[[ "$env_file" == /* ]] || env_file="$PWD/$env_file"  # the caller's, not the compose file's folder
cd "$(dirname "$0")"

DOCKER="${DOCKER:-docker}"
read -ra compose <<<"${COMPOSE:-$DOCKER compose}"
read -ra smoke_args <<<"${SMOKE_ARGS:-}"
export IMAGE="${IMAGE:?set IMAGE, e.g. ghcr.io/owner/catdog}"
URL="${URL:-http://127.0.0.1:8000}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-60}"
GOOD="${DEPLOY_STATE:-.deploy/good}"

log() { echo "deploy: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
last_good_except() { { grep -vxF "$1" "$GOOD" 2>/dev/null || true; } | tail -n 1; }

# Without its host config a deploy would quietly start the api on an empty SQLite volume, with
# no token: refuse before anything changes.
refuse() { log "$* (CATDOG_ENV_FILE; see catdog.env.example): nothing deployed"; exit 1; }
if [ "$env_file" != /dev/null ]; then
  [ -f "$env_file" ] || refuse "no host config at $env_file"
  [ -r "$env_file" ] || refuse "cannot read the host config $env_file"
  case "$(realpath "$env_file")" in
    "$(pwd -P)"/*) refuse "the host config $env_file is inside the checkout, which a release cleans" ;;
  esac
  if grep -q '^[^#]*change-me' "$env_file"; then refuse "the host config $env_file still holds a change-me"; fi
fi
export CATDOG_ENV_FILE="$env_file"  # for Compose and smoke.sh
log "host config $env_file"

# Start TAG (Compose recreates the container when the image changed), wait until /health
# answers 200, then smoke-test it. Fails when either never happens.
start() {
  local tag="$1" t0
  t0="$(now)"
  TAG="$tag" "${compose[@]}" up -d api >/dev/null  # errors still show on stderr
  until curl -fs -o /dev/null --max-time 2 "$URL/health"; do
    if awk -v s="$(since "$t0")" -v limit="$HEALTH_TIMEOUT" 'BEGIN { exit !(s > limit) }'; then
      log "$IMAGE:$tag not healthy after ${HEALTH_TIMEOUT} s"
      TAG="$tag" "${compose[@]}" logs --tail 30 api || true
      return 1
    fi
    sleep 0.2
  done
  log "$IMAGE:$tag healthy $(since "$t0") s after compose up"
  ./smoke.sh "$URL" "${smoke_args[@]}"
}

remember() {
  mkdir -p "$(dirname "$GOOD")"
  [ "$(tail -n 1 "$GOOD" 2>/dev/null)" = "$1" ] || echo "$1" >>"$GOOD"
}

# The failed tag is down or serving wrong answers: put the last good tag back, and prove it.
roll_back_from() {
  local failed="$1" previous t0
  previous="$(last_good_except "$failed")"
  if [ -z "$previous" ]; then
    log "no earlier good tag to roll back to: stopping $IMAGE:$failed"
    TAG="$failed" "${compose[@]}" stop api || true
    return 1
  fi
  log "rolling back to $IMAGE:$previous"
  t0="$(now)"
  if start "$previous"; then
    log "rolled back to $IMAGE:$previous in $(since "$t0") s"
  else
    log "ROLLBACK FAILED: $IMAGE:$previous does not pass smoke either"
    return 1
  fi
}

if [ "${1:-}" = --rollback ]; then
  current="$(tail -n 1 "$GOOD" 2>/dev/null || true)"
  previous="$(last_good_except "$current")"
  [ -n "$previous" ] || { log "nothing to roll back to (history: $GOOD)"; exit 1; }
  start "$previous" || { log "ROLLBACK FAILED: $IMAGE:$previous does not pass smoke"; exit 1; }
  grep -vxF "$current" "$GOOD" >"$GOOD.new" || true  # a later rollback steps further back
  mv "$GOOD.new" "$GOOD"
  log "rolled back from $IMAGE:$current to $IMAGE:$previous"
  exit 0
fi

tag="${1:?usage: $0 TAG | --rollback}"
log "deploying $IMAGE:$tag"
"$DOCKER" pull --quiet "$IMAGE:$tag" >/dev/null || { log "cannot pull $IMAGE:$tag: nothing changed"; exit 1; }
if start "$tag"; then
  remember "$tag"
  log "$IMAGE:$tag is live"
else
  log "$IMAGE:$tag FAILED its checks"
  roll_back_from "$tag" || true
  exit 1
fi
