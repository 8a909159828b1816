# shellcheck shell=bash
# scripts/lib/services.sh — find or start the PostgreSQL and Redis that the tests need, and install the
# Debian packages the tests use. Sourced by scripts/test; every function stops with a clear message.
#
# What each ensure_* does, in order (the first that works wins):
#   PostgreSQL: $DATABASE_URL → a server answering on 127.0.0.1:5432 → a throwaway server from the local
#               binaries (initdb + pg_ctl, on a free port, as a non-root user) → the same after
#               `apt-get install postgresql` → `docker compose up postgres` where a Docker engine runs.
#   Redis:      $REDIS_URL → a server answering PING on 127.0.0.1:6379 → a throwaway redis-server on a
#               free port → the same after `apt-get install redis-server` → `docker compose up redis`.
# Only what was started here is stopped again (services_cleanup, run from scripts/test's EXIT trap).
# TB_TEST_THROWAWAY_SERVICES=1 skips the two "already answering" probes (isolation, or testing this file).

TB_TMP="${TB_TMP:-}"
TB_CLEANUPS=()
TB_APT_UPDATED=0

say() { printf 'scripts/test: %s\n' "$*"; }
die() {
  printf 'scripts/test: error: %s\n' "$*" >&2
  exit 1
}

tb_tmpdir() {
  if [[ -z "$TB_TMP" ]]; then
    TB_TMP="$(mktemp -d "${TMPDIR:-/tmp}/token-broker-test.XXXXXX")"
    TB_CLEANUPS+=("rm -rf '$TB_TMP'")
  fi
}

# Runs every registered cleanup, newest first. Idempotent.
services_cleanup() {
  local i
  for ((i = ${#TB_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${TB_CLEANUPS[$i]}" >/dev/null 2>&1 || true
  done
  TB_CLEANUPS=()
}

# A password-free URL for messages.
redact_url() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }

# tcp_open HOST PORT: something accepts connections there.
tcp_open() {
  (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1
}

# A TCP port on 127.0.0.1 that nothing answers on (checked, not reserved: used at once).
free_port() {
  local port tries=0
  while ((tries++ < 200)); do
    port=$((20000 + RANDOM % 30000))
    if ! tcp_open 127.0.0.1 "$port"; then
      echo "$port"
      return 0
    fi
  done
  die "found no free TCP port on 127.0.0.1"
}

# --- privileges and packages -------------------------------------------------------------------------

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    return 1
  fi
}

can_install() {
  command -v apt-get >/dev/null 2>&1 && { [[ $EUID -eq 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
}

# apt_install PACKAGE...: installs Debian packages (apt-get update once per run).
apt_install() {
  can_install || return 1
  say "installing Debian package(s): $* (apt-get)"
  if ((TB_APT_UPDATED == 0)); then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
    TB_APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

docker_engine() {
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

# compose_up SERVICE: starts one docker-compose.yml service and waits for its health check.
compose_up() {
  say "starting '$1' with docker compose (no local server or binaries)"
  docker compose up -d --wait "$1" >/dev/null || die "docker compose up $1 failed"
  TB_CLEANUPS+=("docker compose rm -fsv '$1'")
}

# --- PostgreSQL --------------------------------------------------------------------------------------

pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p 5432 -t 3
  else
    tcp_open 127.0.0.1 5432
  fi
}

pg_bindir() {
  local initdb
  initdb="$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"
  [[ -x "$initdb" ]] && dirname "$initdb"
}

# The user a throwaway server runs as: initdb refuses root.
pg_user() {
  if [[ $EUID -ne 0 ]]; then
    id -un
  elif id postgres >/dev/null 2>&1; then
    echo postgres
  else
    id token-broker-test >/dev/null 2>&1 ||
      useradd --system --no-create-home --shell /usr/sbin/nologin token-broker-test ||
      die "cannot create a non-root user for initdb"
    echo token-broker-test
  fi
}

# run_as USER COMMAND...
run_as() {
  local user="$1"
  shift
  if [[ "$user" == "$(id -un)" ]]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u "$user" -- "$@"
  else
    su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
  fi
}

# start_throwaway_postgres BINDIR [SERVER_OPTIONS]: initdb + pg_ctl start on a free port; sets
# DATABASE_URL. Without SERVER_OPTIONS the server is disposable and fast (fsync off); scripts/bench
# passes durable settings of its own.
start_throwaway_postgres() {
  local bindir="$1" user port dir
  local options="${2:--c fsync=off -c synchronous_commit=off -c full_page_writes=off}"
  user="$(pg_user)"
  port="$(free_port)"
  tb_tmpdir
  dir="$TB_TMP/postgres"
  mkdir -p "$dir"
  chmod 755 "$TB_TMP"
  chown "$user" "$dir"
  run_as "$user" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$TB_TMP/initdb.log" 2>&1 ||
    die "initdb failed; see $(cat "$TB_TMP/initdb.log")"
  # A socket in the data dir: a server that needs no system directories.
  run_as "$user" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200 $options" \
    start >/dev/null || die "PostgreSQL did not start: $(tail -n 20 "$dir/server.log" 2>/dev/null)"
  TB_CLEANUPS+=("run_as '$user' '$bindir/pg_ctl' -D '$dir/data' -m immediate stop")
  DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  say "started a throwaway PostgreSQL ($("$bindir/postgres" --version | awk '{print $3}')) on port $port; it is removed when the tests end"
}

ensure_postgres() {
  local bindir
  if [[ -n "${DATABASE_URL:-}" ]]; then
    say "using PostgreSQL at $(redact_url "$DATABASE_URL") (DATABASE_URL)"
  elif [[ "${TB_TEST_THROWAWAY_SERVICES:-0}" != 1 ]] && pg_answers; then
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    say "using PostgreSQL at $DATABASE_URL (a server answers there)"
  elif bindir="$(pg_bindir)"; then
    start_throwaway_postgres "$bindir"
  elif can_install; then
    # Only the binaries: no cluster of the package's own left running on port 5432.
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' | as_root tee /etc/postgresql-common/createcluster.d/token-broker-test.conf >/dev/null
    apt_install postgresql || die "apt-get install postgresql failed"
    bindir="$(pg_bindir)" || die "PostgreSQL installed, but no initdb under /usr/lib/postgresql/*/bin"
    start_throwaway_postgres "$bindir"
  elif docker_engine; then
    compose_up postgres
    DATABASE_URL="postgres://postgres:postgres@127.0.0.1:${POSTGRES_HOST_PORT:-5432}/postgres"
    say "using PostgreSQL from docker compose at $(redact_url "$DATABASE_URL")"
  else
    die "no PostgreSQL: set DATABASE_URL, run one on 127.0.0.1:5432, install PostgreSQL, or start a Docker engine"
  fi
  export DATABASE_URL
}

# --- Redis -------------------------------------------------------------------------------------------

redis_answers() {
  # RESP inline command; a server that wants a password answers -NOAUTH, which does not count.
  local reply
  reply="$(
    exec 3<>/dev/tcp/127.0.0.1/6379 || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 3 line <&3 && printf '%s' "$line"
  )" 2>/dev/null || return 1
  [[ "$reply" == +PONG* ]]
}

start_throwaway_redis() {
  local port dir
  port="$(free_port)"
  tb_tmpdir
  dir="$TB_TMP/redis"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null ||
    die "redis-server did not start"
  local tries=0
  until [[ -s "$dir/redis.pid" ]] && tcp_open 127.0.0.1 "$port"; do
    ((tries++ < 100)) || die "redis-server did not answer on port $port: $(tail -n 20 "$dir/redis.log")"
    sleep 0.1
  done
  TB_CLEANUPS+=("kill \$(cat '$dir/redis.pid')")
  REDIS_URL="redis://127.0.0.1:$port"
  say "started a throwaway Redis ($(redis-server --version | grep -o 'v=[^ ]*')) on port $port; it is stopped when the tests end"
}

ensure_redis() {
  if [[ -n "${REDIS_URL:-}" ]]; then
    say "using Redis at $(redact_url "$REDIS_URL") (REDIS_URL)"
  elif [[ "${TB_TEST_THROWAWAY_SERVICES:-0}" != 1 ]] && redis_answers; then
    REDIS_URL="redis://127.0.0.1:6379"
    say "using Redis at $REDIS_URL (a server answers there)"
  elif command -v redis-server >/dev/null 2>&1; then
    start_throwaway_redis
  elif apt_install redis-server; then
    command -v redis-server >/dev/null 2>&1 || die "redis-server installed but not on PATH"
    start_throwaway_redis
  elif docker_engine; then
    compose_up redis
    REDIS_URL="redis://127.0.0.1:${REDIS_HOST_PORT:-6379}"
    say "using Redis from docker compose at $REDIS_URL"
  else
    die "no Redis: set REDIS_URL, run one on 127.0.0.1:6379, install redis-server, or start a Docker engine"
  fi
  export REDIS_URL
}

# The Redis Cluster and Sentinel tests (tests/api/redis_cluster.rs) start their own redis-server
# processes, whichever Redis ensure_redis found: they need the binaries on PATH. A preset
# REDIS_CLUSTER_URL (an existing cluster) makes the cluster tests use it instead.
ensure_redis_binaries() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  apt_install redis-server || die "the Redis Cluster and Sentinel tests need redis-server and redis-cli on PATH: install Redis"
  command -v redis-server >/dev/null 2>&1 || die "redis-server installed but not on PATH"
}

# The fault tests (tests/api/faults.rs) stop and start a private PostgreSQL: they need initdb and
# pg_ctl (TOKEN_BROKER_PG_BINDIR) and, as root, a user to run them as (TOKEN_BROKER_PG_USER).
ensure_postgres_binaries() {
  local bindir
  if ! bindir="$(pg_bindir)"; then
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' | as_root tee /etc/postgresql-common/createcluster.d/token-broker-test.conf >/dev/null
    apt_install postgresql || die "the fault tests need PostgreSQL's initdb and pg_ctl: install PostgreSQL"
    bindir="$(pg_bindir)" || die "PostgreSQL installed, but no initdb under /usr/lib/postgresql/*/bin"
  fi
  export TOKEN_BROKER_PG_BINDIR="$bindir"
  TOKEN_BROKER_PG_USER="$(pg_user)"
  export TOKEN_BROKER_PG_USER
}

# --- end-to-end test tools ---------------------------------------------------------------------------

ensure_chromium() {
  export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
  if [[ ! -x "$CHROMIUM" ]]; then
    apt_install chromium || die "no $CHROMIUM and cannot apt-get install chromium (run as root or with sudo, or set CHROMIUM)"
  fi
  [[ -x "$CHROMIUM" ]] || die "chromium installed, but $CHROMIUM is not there"
}

ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    die "the end-to-end test needs Node.js >= 20.19 and npm (or run scripts/test --no-e2e)"
  fi
  local version
  version="$(node -p 'process.versions.node')"
  node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' ||
    die "Node.js $version is too old for the end-to-end test (oidc-provider needs >= 20.19)"
}

ensure_psql() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client ||
    die "the end-to-end test needs psql (Debian: postgresql-client)"
}

# --- gateways (tests/api/gateways.rs runs real nginx and Caddy) -----------------------------------------

# program_path NAME: the binary on PATH, or in /usr/sbin (Debian's nginx and pgbouncer, not on a
# user's PATH). Prints where the program is, or nothing (status 0 either way: under `set -e` a
# failing `VAR=$(program_path nginx)` would end the script without a word).
program_path() {
  command -v "$1" 2>/dev/null && return 0
  if [[ -x "/usr/sbin/$1" ]]; then echo "/usr/sbin/$1"; fi
}

# The packages' own services (nginx and Caddy both serve port 80) are not left running.
stop_package_services() {
  local name
  for name in "$@"; do
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
      as_root systemctl disable --now "$name" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
      as_root service "$name" stop >/dev/null 2>&1 || true
    fi
  done
}

# nginx (with auth_request) and Caddy: $TOKEN_BROKER_NGINX / $TOKEN_BROKER_CADDY → PATH (and /usr/sbin)
# → `apt-get install nginx caddy`. Exported for the tests, which fail (never skip) without them.
ensure_gateways() {
  local missing=() how="found"
  TOKEN_BROKER_NGINX="${TOKEN_BROKER_NGINX:-$(program_path nginx)}"
  TOKEN_BROKER_CADDY="${TOKEN_BROKER_CADDY:-$(program_path caddy)}"
  [[ -n "$TOKEN_BROKER_NGINX" ]] || missing+=(nginx)
  [[ -n "$TOKEN_BROKER_CADDY" ]] || missing+=(caddy)
  if ((${#missing[@]})); then
    apt_install "${missing[@]}" ||
      die "the gateway tests (tests/api/gateways.rs) need: ${missing[*]}. Install (Debian: apt-get install --no-install-recommends ${missing[*]}; needs root or sudo), put on PATH, or set TOKEN_BROKER_NGINX / TOKEN_BROKER_CADDY"
    stop_package_services "${missing[@]}"
    TOKEN_BROKER_NGINX="${TOKEN_BROKER_NGINX:-$(program_path nginx)}"
    TOKEN_BROKER_CADDY="${TOKEN_BROKER_CADDY:-$(program_path caddy)}"
    [[ -n "$TOKEN_BROKER_NGINX" && -n "$TOKEN_BROKER_CADDY" ]] || die "${missing[*]} installed, but not found on PATH or in /usr/sbin"
    how="installed ${missing[*]} with apt-get"
  fi
  [[ -x "$TOKEN_BROKER_NGINX" ]] || die "TOKEN_BROKER_NGINX=$TOKEN_BROKER_NGINX is not an executable"
  [[ -x "$TOKEN_BROKER_CADDY" ]] || die "TOKEN_BROKER_CADDY=$TOKEN_BROKER_CADDY is not an executable"
  "$TOKEN_BROKER_NGINX" -V 2>&1 | grep -q -- --with-http_auth_request_module ||
    die "$TOKEN_BROKER_NGINX lacks the auth_request module (Debian's nginx has it); set TOKEN_BROKER_NGINX to one that has it"
  export TOKEN_BROKER_NGINX TOKEN_BROKER_CADDY
  say "gateways ($how): nginx $("$TOKEN_BROKER_NGINX" -v 2>&1 | sed 's#.*nginx/##') at $TOKEN_BROKER_NGINX, caddy $("$TOKEN_BROKER_CADDY" version 2>/dev/null | awk '{print $1}') at $TOKEN_BROKER_CADDY"
}

# --- PgBouncer (tests/api/database_poolers.rs runs the broker through a real one) ----------------------

# $TOKEN_BROKER_PGBOUNCER → PATH (and /usr/sbin) → `apt-get install pgbouncer`. Exported for the test,
# which fails (never skips) without it. The package's own service (port 6432) is not left running.
ensure_pgbouncer() {
  local how="found"
  TOKEN_BROKER_PGBOUNCER="${TOKEN_BROKER_PGBOUNCER:-$(program_path pgbouncer)}"
  if [[ -z "$TOKEN_BROKER_PGBOUNCER" ]]; then
    apt_install pgbouncer ||
      die "the PgBouncer test (tests/api/database_poolers.rs) needs pgbouncer. Install (Debian: apt-get install --no-install-recommends pgbouncer; needs root or sudo), put on PATH, or set TOKEN_BROKER_PGBOUNCER"
    stop_package_services pgbouncer
    TOKEN_BROKER_PGBOUNCER="$(program_path pgbouncer)"
    [[ -n "$TOKEN_BROKER_PGBOUNCER" ]] || die "pgbouncer installed, but not found on PATH or in /usr/sbin"
    how="installed with apt-get"
  fi
  [[ -x "$TOKEN_BROKER_PGBOUNCER" ]] || die "TOKEN_BROKER_PGBOUNCER=$TOKEN_BROKER_PGBOUNCER is not an executable"
  export TOKEN_BROKER_PGBOUNCER
  say "PgBouncer ($how): $("$TOKEN_BROKER_PGBOUNCER" --version 2>/dev/null | head -n 1) at $TOKEN_BROKER_PGBOUNCER"
}

# --- Kubernetes manifests (tests/api/deploy_files.rs renders deploy/kubernetes and validates it) ------

TB_KUBERNETES_VALIDATE_VERSION=1.37.0

# kubectl (for `kubectl kustomize`): $TOKEN_BROKER_KUBECTL → PATH. Never installed here: Debian's
# `kubernetes-client` is 1.20, whose built-in kustomize predates what deploy/kubernetes uses, so
# without a kubectl >= 1.24 this stops and says so.
# kubernetes-validate: $TOKEN_BROKER_KUBERNETES_VALIDATE → PATH → the pinned version from PyPI,
# pip-installed into a venv under the target directory (kept between runs). Both are exported for the
# tests, which fail (never skip) without them.
ensure_kube_tools() {
  local kubectl="${TOKEN_BROKER_KUBECTL:-}" validate="${TOKEN_BROKER_KUBERNETES_VALIDATE:-}" minor how
  kubectl="${kubectl:-$(command -v kubectl || true)}"
  [[ -n "$kubectl" && -x "$kubectl" ]] ||
    die "the Kubernetes manifest tests need kubectl >= 1.24 (for 'kubectl kustomize'; Debian's kubernetes-client is too old): install it (https://kubernetes.io/docs/tasks/tools/) or set TOKEN_BROKER_KUBECTL"
  minor="$("$kubectl" version --client -o json 2>/dev/null | sed -n 's/^ *"minor": *"\([0-9]*\).*/\1/p' | head -n 1)"
  [[ "$minor" =~ ^[0-9]+$ ]] && ((minor >= 24)) ||
    die "$kubectl is not kubectl >= 1.24 (client minor version '${minor:-unknown}'): its kustomize cannot render deploy/kubernetes; set TOKEN_BROKER_KUBECTL to a newer one"

  validate="${validate:-$(command -v kubernetes-validate || true)}"
  how="found"
  if [[ -z "$validate" ]]; then
    local venv="${CARGO_TARGET_DIR:-target}/kube-tools/venv"
    [[ "$venv" = /* ]] || venv="$PWD/$venv"
    validate="$venv/bin/kubernetes-validate"
    if [[ "$("$validate" --version 2>/dev/null)" != "$TB_KUBERNETES_VALIDATE_VERSION" ]]; then
      command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv ||
        die "installing kubernetes-validate needs python3 (Debian: python3, python3-venv), or set TOKEN_BROKER_KUBERNETES_VALIDATE"
      say "installing kubernetes-validate $TB_KUBERNETES_VALIDATE_VERSION from PyPI into $venv (pip)"
      rm -rf "$venv"
      { python3 -m venv "$venv" >/dev/null 2>&1 || { apt_install python3-venv && python3 -m venv "$venv"; }; } &&
        "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$TB_KUBERNETES_VALIDATE_VERSION" ||
        die "pip install kubernetes-validate==$TB_KUBERNETES_VALIDATE_VERSION failed (needs PyPI, or set TOKEN_BROKER_KUBERNETES_VALIDATE)"
      how="installed with pip"
    fi
  fi
  [[ -x "$validate" ]] || die "TOKEN_BROKER_KUBERNETES_VALIDATE=$validate is not an executable"
  TOKEN_BROKER_KUBECTL="$kubectl"
  TOKEN_BROKER_KUBERNETES_VALIDATE="$validate"
  export TOKEN_BROKER_KUBECTL TOKEN_BROKER_KUBERNETES_VALIDATE
  say "kubernetes tools ($how): kubectl $("$kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p') at $kubectl, kubernetes-validate $("$validate" --version 2>/dev/null) at $validate"
}
