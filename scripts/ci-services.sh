#!/usr/bin/env bash
# System tools the test suite needs beyond the Python venv; .ci/run calls it before scripts/test.sh.
#   - headless Chromium (Debian package `chromium`), for tests/test_plots_diff.py;
#   - the browser bundles of vega, vega-lite and vega-embed that `dvc plots diff` pages load from a
#     CDN (the tests have no internet; they load these local copies instead), fetched with `npm pack`
#     into ${MICROFP_VEGA_DIR:-~/.cache/microfp/vega}.
# Idempotent, quiet, and a no-op when everything is there. Never fatal: a test whose tool could not
# be installed is skipped and names the reason.
set -uo pipefail

warn() { echo "ci-services: $*" >&2; }

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
            || warn "apt-get install chromium failed (plots-diff browser tests will be skipped)"
    else
        warn "chromium is missing and apt-get is not usable here (plots-diff browser tests will be skipped)"
    fi
fi

# The versions dvc-render 1.0.2 (dvc 3.67.1) puts in its pages.
vega_dir="${MICROFP_VEGA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/microfp/vega}"
for spec in vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2; do
    name="${spec%@*}"
    [ -s "$vega_dir/$name.min.js" ] && continue
    if ! command -v npm >/dev/null 2>&1; then
        warn "npm is missing: cannot fetch $spec (vega plots will not be rendered in the tests)"
        break
    fi
    tmp="$(mktemp -d)"
    if tarball="$(cd "$tmp" && npm pack --silent "$spec" 2>/dev/null | tail -n 1)" && [ -s "$tmp/$tarball" ] \
        && tar -xzf "$tmp/$tarball" -C "$tmp" "package/build/$name.min.js" 2>/dev/null; then
        mkdir -p "$vega_dir" && mv "$tmp/package/build/$name.min.js" "$vega_dir/$name.min.js"
    else
        warn "npm pack $spec failed (vega plots will not be rendered in the tests)"
    fi
    rm -rf "$tmp"
done
exit 0
