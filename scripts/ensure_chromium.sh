#!/usr/bin/env bash
# Installs Debian's Chromium for the one real-browser test when it is missing and we may install
# (root with apt). Never downloads a browser of its own; the test skips with a reason otherwise.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (apt-get)..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium; the browser test will be skipped" >&2
fi
exit 0
