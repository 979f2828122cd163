#!/bin/sh
# What `make bench` needs beyond the project: Debian's nginx, wrk and redis-server (apt), and
# the bench extra (matplotlib for the chart) in the virtualenv given as $1.
set -eu
python="${1:-.venv/bin/python}"
missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "bench/setup.sh: installing$missing from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
fi
"$python" -c 'import matplotlib' 2>/dev/null || "$python" -m pip install --quiet -e '.[bench]'
