# Shared helpers for clipq's install scripts (sourced, not run).
# Logs go to stderr so that scripts can print their one result on stdout.

CLIPQ_CACHE="${CLIPQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clipq}"

log() { printf '[clipq] %s\n' "$*" >&2; }

# die STEP MESSAGE RETRY: stop the install, saying which step failed and how to retry.
die() {
    printf '\n[clipq] ERROR in step "%s": %s\n[clipq] To retry: %s\n' "$1" "$2" "$3" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else return 1
    fi
}

# apt_ensure PKG...: install the Debian packages that are missing (nothing to do when all are there).
apt_ensure() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "${CLIPQ_SKIP_APT:-0}" = 1 ]; then
        die "apt packages" "missing Debian packages: ${missing[*]} (CLIPQ_SKIP_APT=1 forbids installing them)" \
            "apt-get install ${missing[*]}, then rerun"
    fi
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
        || die "apt packages" "apt-get update failed (no root/sudo, or no access to Debian mirrors)" \
               "as root: apt-get update && apt-get install --no-install-recommends ${missing[*]}; then rerun"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "apt packages" "apt-get install failed for: ${missing[*]}" \
               "as root: apt-get install --no-install-recommends ${missing[*]}; then rerun"
}
