# shellcheck shell=bash
# scripts/test's "schemathesis" stage: property-based tests of the HTTP API against its own OpenAPI
# document (schemathesis, pinned, pip-installed into target/schemathesis/venv). Sourced by
# scripts/test after scripts/lib/services.sh.
#
# The real broker binary runs in `dev` mode (in-memory stores, the built-in IdP: no services
# needed), with one relay route, `self`, whose upstream is the broker itself (so /api/self/... is
# relayed for real and comes back as the broker's own answer). Three passes, every check
# (`checks.enabled = true` in scripts/lib/schemathesis.toml: no 5xx, status codes, content types,
# headers and bodies as the document says, schema-valid input accepted, invalid input refused,
# 405 + Allow for undeclared methods, …):
#   1. anonymous: every operation, no cookie (the 401/403 answers);
#   2. logged in: every operation but POST /logout, with a session cookie from a real login through
#      the dev IdP's form, `Origin` of the broker and `X-CSRF: 1` (the authenticated answers:
#      /session 200, /auth 200 with a token, the relay);
#   3. logged in, POST /logout only: last, because the first successful call ends the session.
# Excluded, with reasons (scripts/lib/schemathesis.toml): positive_data_acceptance accepts a 400 on
# GET /login (`return_to` is valid only on configured origins), POST /backchannel-logout
# (`logout_token` is valid only when the IdP signed it) and the relay (a `path` with encoded
# slashes, dot segments or control characters is refused by design). The relay's `name` is pinned to `self`
# (every other name is a 404, which tests/api/relay.rs covers).
#
# Examples per operation: TB_SCHEMATHESIS_EXAMPLES, default 25 (20–45 s for the three passes on 2
# cores, depending on load); 300 with --long (TB_TEST_LONG=1).

TB_SCHEMATHESIS_VERSION=4.32.5

ensure_schemathesis() {
  local venv="${CARGO_TARGET_DIR:-target}/schemathesis/venv"
  [[ "$venv" = /* ]] || venv="$PWD/$venv"
  SCHEMATHESIS="$venv/bin/schemathesis"
  if [[ "$("$SCHEMATHESIS" --version 2>/dev/null)" != *" $TB_SCHEMATHESIS_VERSION" ]]; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv ||
      die "the schemathesis stage needs python3 (Debian: python3, python3-venv)"
    say "installing schemathesis $TB_SCHEMATHESIS_VERSION from PyPI into $venv (pip)"
    rm -rf "$venv"
    { python3 -m venv "$venv" >/dev/null 2>&1 || { apt_install python3-venv && python3 -m venv "$venv"; }; } &&
      "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$TB_SCHEMATHESIS_VERSION" ||
      die "pip install schemathesis==$TB_SCHEMATHESIS_VERSION failed (needs PyPI)"
  fi
  say "schemathesis: $("$SCHEMATHESIS" --version) at $SCHEMATHESIS"
}

# schemathesis_stage BROKER_BINARY: the three passes; fails on the first pass that finds anything.
schemathesis_stage() {
  local bin="$1" port base dir pid examples status=0 session
  examples="${TB_SCHEMATHESIS_EXAMPLES:-$([[ "${TB_TEST_LONG:-0}" == 1 ]] && echo 300 || echo 25)}"
  port="$(free_port)"
  base="http://127.0.0.1:$port"
  tb_tmpdir
  dir="$TB_TMP/schemathesis"
  mkdir -p "$dir"
  "$bin" dev --listen-addr "127.0.0.1:$port" --api-routes "self=$base/relayed" >"$dir/broker.log" 2>&1 &
  pid=$!
  TB_CLEANUPS+=("kill $pid")
  local tries=0
  until curl -fs -o /dev/null "$base/healthz"; do
    ((tries++ < 150)) || { echo "the dev broker did not come up: $(tail -n 20 "$dir/broker.log")"; return 1; }
    sleep 0.1
  done

  # A real login: /login → the dev IdP's form (POST) → /callback.
  local jar="$dir/cookies" authorize callback
  authorize="$(curl -s -c "$jar" -b "$jar" -o /dev/null -w '%{redirect_url}' "$base/login?return_to=/")" &&
    callback="$(curl -s -o /dev/null -w '%{redirect_url}' -X POST "${authorize%%\?*}" --data "${authorize#*\?}&username=schemathesis")" &&
    curl -s -c "$jar" -b "$jar" -o /dev/null "$callback" || return 1
  session="$(awk '$6 == "session" { print $7 }' "$jar")"
  [[ -n "$session" ]] || { echo "the login through the dev IdP produced no session cookie"; return 1; }

  # st_pass NAME ARG...: one schemathesis pass (from $dir: it writes no files but may look for config).
  st_pass() {
    local name="$1"
    shift
    echo "--- schemathesis: $name ($examples examples per operation)"
    (cd "$dir" && "$SCHEMATHESIS" --config-file "$OLDPWD/scripts/lib/schemathesis.toml" run "$base/openapi.json" \
      --max-examples "$examples" --generation-database none --no-color --workers 2 "$@" >"$dir/$name.log" 2>&1)
    local rc=$?
    # The summary, not the hundreds of lines of progress.
    sed -n '/^=* *SUMMARY/,$p' "$dir/$name.log" | grep -v '^$'
    if ((rc != 0)); then
      echo "--- schemathesis: $name failed; its findings:"
      sed -n '/^=* *FAILURES/,/^=* *SUMMARY/p' "$dir/$name.log"
      mkdir -p target/schemathesis/last-failure && cp "$dir"/*.log target/schemathesis/last-failure/ 2>/dev/null
      echo "(full logs, the broker's too: target/schemathesis/last-failure/)"
    fi
    return "$rc"
  }
  local auth=(-H "Cookie: session=$session" -H "Origin: $base" -H "X-CSRF: 1")
  st_pass anonymous &&
    st_pass logged-in --exclude-path /logout "${auth[@]}" &&
    st_pass logout --include-path /logout "${auth[@]}" || status=$?
  kill "$pid" 2>/dev/null
  return "$status"
}
