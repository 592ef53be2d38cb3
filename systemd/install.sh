#!/bin/sh
# Install drawbot as a systemd service: steps 2-4 of docs/deploy.md in one go. Safe to run again (keeps an existing
# config and token file; refreshes the unit).
#
#   sudo systemd/install.sh                 # code + .venv (from `make install`) already in /opt/drawbot
#   sudo PREFIX=/srv/drawbot systemd/install.sh
#
# DESTDIR=/some/dir writes every file under that folder instead of /, and skips what needs root (user, ownership,
# systemctl): for packaging, and for the tests.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)   # this checkout: config.example.toml, systemd/*
PREFIX=${PREFIX:-$SRC}                  # where the code and its .venv live for the service
DESTDIR=${DESTDIR:-}
STATE=/var/lib/drawbot
ETC=/etc/drawbot

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "run me as root: sudo $0"
fi
case "$PREFIX" in
    /home/*|/root/*|/run/user/*)
        die "$PREFIX is under a home folder, which the service cannot see (ProtectHome=yes). Put the code in /opt/drawbot: sudo cp -a $PREFIX /opt/drawbot && cd /opt/drawbot && sudo make install";;
    *'#'*) die "the install path must not contain '#': $PREFIX";;
esac
[ -x "$PREFIX/.venv/bin/drawbot" ] || die "$PREFIX/.venv/bin/drawbot not found: run 'make install' in $PREFIX first"

# 1. A system user for the bot; the video/render groups exist on most distributions, create them where not.
if [ -z "$DESTDIR" ]; then
    for group in video render; do
        getent group "$group" >/dev/null || groupadd --system "$group"
    done
    if ! id drawbot >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin drawbot
        say "created the system user drawbot"
    fi
fi

# 2. Folders: state (database, pictures, weights) owned by the bot; config readable by it, tokens by root only.
install -d -m 0755 "$DESTDIR/etc/systemd/system"
install -d -m 0750 "$DESTDIR$ETC" "$DESTDIR$STATE" "$DESTDIR$STATE/models"
if [ -z "$DESTDIR" ]; then
    chown root:drawbot "$ETC"
    chown drawbot:drawbot "$STATE" "$STATE/models"
fi

# 3. Config and token file, only when missing: never overwrite the owner's edits.
if [ ! -e "$DESTDIR$ETC/config.toml" ]; then
    sed -e "s#^models_dir = .*#models_dir = \"$STATE/models\"#" \
        -e "s#^state_dir = .*#state_dir = \"$STATE\"#" \
        "$SRC/config.example.toml" > "$DESTDIR$ETC/config.toml"
    chmod 0640 "$DESTDIR$ETC/config.toml"
    [ -n "$DESTDIR" ] || chown root:drawbot "$ETC/config.toml"
    say "wrote $ETC/config.toml (state and weights under $STATE); edit vram_budget_gb for your card"
fi
if [ ! -e "$DESTDIR$ETC/drawbot.env" ]; then
    install -m 0600 "$SRC/systemd/drawbot.env.example" "$DESTDIR$ETC/drawbot.env"
    [ -n "$DESTDIR" ] || chown root:root "$ETC/drawbot.env"
    say "wrote $ETC/drawbot.env (mode 0600): put your bot tokens there"
fi

# 4. The unit, pointed at PREFIX. Progressive restart back-off needs systemd 254+ (RestartSteps=): a drop-in there.
sed "/^#/!s#/opt/drawbot#$PREFIX#g" "$SRC/systemd/drawbot.service" > "$DESTDIR/etc/systemd/system/drawbot.service"
chmod 0644 "$DESTDIR/etc/systemd/system/drawbot.service"
systemd_version=$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 }' || true)
case "$systemd_version" in
    ''|*[!0-9]*) systemd_version=0;;
esac
if [ "$systemd_version" -ge 254 ]; then
    install -d -m 0755 "$DESTDIR/etc/systemd/system/drawbot.service.d"
    cat > "$DESTDIR/etc/systemd/system/drawbot.service.d/restart-backoff.conf" <<'EOF'
# Written by drawbot's install.sh (systemd 254+): restart after 15 s, then longer each time, up to 5 minutes.
[Service]
RestartSteps=5
RestartMaxDelaySec=300
EOF
fi
if [ -z "$DESTDIR" ]; then
    systemctl daemon-reload
    systemd-analyze verify /etc/systemd/system/drawbot.service
fi
say "installed /etc/systemd/system/drawbot.service (code in $PREFIX)"

cat <<EOF

Next (docs/deploy.md has the details):
  sudoedit $ETC/drawbot.env                    # your bot token(s)
  sudoedit $ETC/config.toml                    # vram_budget_gb = your card's GiB
  sudo -u drawbot HOME=$STATE $PREFIX/.venv/bin/drawbot --config $ETC/config.toml download
  sudo systemctl enable --now drawbot
  journalctl -u drawbot -f
EOF
