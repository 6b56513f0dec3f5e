#!/bin/sh
# Writes monitoring/alertmanager.yml with the webhook URL in place and checks it with amtool:
# Alertmanager reads no environment variables in its config. Refuses (exit 1) without an
# http(s) ALERT_WEBHOOK_URL, so an Alertmanager that would notify no one never starts.
# POSIX sh: it runs in the prom/alertmanager image (busybox) as well as on Debian.
#
#   ALERT_WEBHOOK_URL=https://hooks.example/catdog monitoring/alertmanager_config.sh OUT [IN]
set -eu
out=${1:?usage: alertmanager_config.sh OUT [IN]}
in=${2:-$(dirname "$0")/alertmanager.yml}
case "${ALERT_WEBHOOK_URL:-}" in
  http://* | https://*) ;;
  *)
    echo "alertmanager_config.sh: ALERT_WEBHOOK_URL must be the http(s) URL alerts are posted to" \
      "(set it in the host config, \$CATDOG_ENV_FILE, default /etc/catdog/catdog.env); it is '${ALERT_WEBHOOK_URL:-}'" >&2
    exit 1
    ;;
esac
# sed's replacement treats & and \ specially, and | is the delimiter here.
url=$(printf '%s\n' "$ALERT_WEBHOOK_URL" | sed 's/[&|\\]/\\&/g')
sed "s|\${ALERT_WEBHOOK_URL}|$url|g" "$in" > "$out"
amtool check-config "$out"
