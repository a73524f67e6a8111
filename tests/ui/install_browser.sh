#!/usr/bin/env bash
# Installs Debian's Chromium for the UI tests, once. Idempotent: does nothing when /usr/bin/chromium exists.
# Never downloads a browser build of its own (no `playwright install`): only the distribution package.
# Exit status: 0 installed or present; 3 cannot install here (not root, or no apt-get); else apt's failure.
set -euo pipefail

BROWSER=/usr/bin/chromium
if [[ -x "$BROWSER" ]]; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "install_browser.sh: $BROWSER is missing and we are not root; install it: apt-get install -y chromium" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser.sh: $BROWSER is missing and there is no apt-get to install it with" >&2
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
# A stale or empty package list finds no chromium: refresh it first (cheap when already fresh).
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x "$BROWSER"
