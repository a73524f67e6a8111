#!/bin/sh
# Installs, from Debian's packages, the real components tests/deploy runs: prometheus (and promtool),
# nginx, and docker-compose when no compose (plugin or standalone) is present. Idempotent: a no-op
# when all are there. Needs root and apt-get; otherwise it names what is missing and exits 1, and the
# tests that need it skip with that reason. `make test-tools` runs it; the tests call it themselves.
set -eu
PATH="$PATH:/usr/sbin:/sbin"

missing=""
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    missing="$missing docker-compose"
fi
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tools.sh: cannot install$missing (needs root and apt-get)" >&2
    exit 1
fi

# The packages would start their services (nginx on :80, prometheus on :9090); the tests start
# their own on loopback. policy-rc.d forbids the start, as Docker images do; ours is removed after.
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
fi
cleanup() { [ -z "$created" ] || rm -f "$policy"; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # $missing is a list of package names
apt-get install -y -q --no-install-recommends $missing >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
echo "install_tools.sh: installed$missing"
