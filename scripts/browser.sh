#!/usr/bin/env bash
# Debian's Chromium (with a font, its one recommendation the pages need), which the web
# view's tests (tests/web/) drive headless through Playwright; Playwright's own browser
# downloads are never used. As root with apt: installed from Debian's package when
# missing. Otherwise only said: tests/web then skip (and fail under CI,
# tests/support/env.py).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "chromium: installing Debian's package"
  apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; }
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
else
  echo "chromium: /usr/bin/chromium is missing; install it (apt-get install chromium) for" \
       "the web view's tests (tests/web/)" >&2
fi
