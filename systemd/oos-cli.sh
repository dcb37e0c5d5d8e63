#!/bin/sh
# /usr/local/bin/oos: the OOS command line of an installed OOS. Run by root, it switches to the
# service's user, so any file it creates in the data directory stays the daemon's.
export OOS_CONFIG="${OOS_CONFIG:-/etc/oos/oos.toml}" OOS_DATA_DIR="${OOS_DATA_DIR:-/var/lib/oos}"
export PYTHONPATH=/opt/oos/app PYTHONDONTWRITEBYTECODE=1
if [ "$(id -u)" = 0 ]; then
    exec runuser -u oos -- /opt/oos/venv/bin/python -m oos_cli "$@"
fi
exec /opt/oos/venv/bin/python -m oos_cli "$@"
