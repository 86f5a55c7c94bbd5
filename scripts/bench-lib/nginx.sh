# nginx as a plain reverse proxy for the benchmarks; sourced by scripts/bench
# and scripts/bench-scenarios, which define `die`, `LIB` and `RUN_DIR`.

# nginx often lives in /usr/sbin, which is not on every PATH.
find_nginx() {
    command -v nginx 2>/dev/null && return 0
    [[ -x /usr/sbin/nginx ]] && { echo /usr/sbin/nginx; return 0; }
    return 1
}

# install_missing PACKAGE...: apt-get install the packages, as root or with sudo.
install_missing() {
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "not root and no sudo: install $* yourself"
        sudo=sudo
    fi
    command -v apt-get >/dev/null || die "no apt-get: install $* yourself"
    $sudo apt-get update >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "$@" >&2
}

# start_nginx NGINX WORKERS UPSTREAM_PORT LISTEN_PORT: nginx (binary NGINX)
# in the foreground under $RUN_DIR/nginx, in front of 127.0.0.1:UPSTREAM_PORT
# (scripts/bench-lib/nginx.conf.template); its pid in NGINX_PID.
start_nginx() {
    local nginx=$1 workers=$2 upstream=$3 listen=$4 prefix="$RUN_DIR/nginx" user_line=""
    mkdir -p "$prefix"
    [[ $(id -u) -eq 0 ]] && user_line="user root;"
    sed -e "s|@USER_LINE@|$user_line|" -e "s|@WORKERS@|$workers|" -e "s|@PREFIX@|$prefix|g" \
        -e "s|@UPSTREAM_PORT@|$upstream|" -e "s|@LISTEN_PORT@|$listen|" \
        "$LIB/nginx.conf.template" >"$prefix/nginx.conf"
    "$nginx" -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
        2>"$RUN_DIR/nginx-test.log" || { cat "$RUN_DIR/nginx-test.log" >&2; die "nginx config test failed"; }
    "$nginx" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" >"$RUN_DIR/nginx.log" 2>&1 &
    NGINX_PID=$!
}
