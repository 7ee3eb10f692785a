#!/usr/bin/env bash
# Install anomaly-factory from nothing into ./.venv (pinned by requirements.lock).
# Also installs headless Chromium (report screenshots) when apt-get is available as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
# uv ignores pip's find-links, so the registry's standard torch/torchvision builds are used.
.venv/bin/uv pip install --python .venv/bin/python --quiet -r requirements.lock
.venv/bin/uv pip install --python .venv/bin/python --quiet --no-deps -e .
# Byte-compile once: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every process
# would otherwise recompile torch, diffusers and transformers from source at import.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: chromium not installed; report screenshot tests will be skipped" >&2
fi
echo "installed: $(.venv/bin/anomaly-factory --help >/dev/null && echo anomaly-factory CLI ready)"
