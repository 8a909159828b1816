# shellcheck shell=bash
# scripts/test's "fuzz" stage: the cargo-fuzz (libFuzzer) targets in fuzz/, one per parser of
# untrusted or operator-given text (fuzz/fuzz_targets/*.rs → token_broker::fuzzing):
#   cookies         the Cookie header → session / login-binding cookie   (src/routes/cookies.rs)
#   return_to       ReturnTo::parse against an allow-list                (src/domain/return_to.rs)
#   callback_query  the /callback query (serde_urlencoded) → CallbackQuery::parse (src/routes/login.rs)
#   jwt_header      a compact JWS's header                               (src/oidc/jws.rs)
#   redis_url       REDIS_URL → RedisTopology                            (src/store/redis/topology.rs)
# Sourced by scripts/test after scripts/lib/services.sh.
#
# libFuzzer needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them
# (no nightly toolchain is installed or fetched). Built without a sanitizer (`--sanitizer none`):
# the crate is safe Rust, so AddressSanitizer would find nothing a panic does not, and it doubles
# build and run time; debug assertions (overflow checks) stay on, as cargo fuzz sets them.
#
# scripts/test runs this stage in CI (CI=true), with --fuzz and with --long (the build alone is ~12
# CPU-minutes from scratch); a developer's default run feeds the committed seeds to the same entry
# points in a unit test instead.
# Time per target: TB_FUZZ_SECONDS, default 300 s with --long (TB_TEST_LONG=1), else 12 s (one
# minute for the five). A short
# run by hand: bash -c 'source scripts/lib/services.sh; source scripts/lib/fuzz.sh; ensure_cargo_fuzz; fuzz_stage'
# Each run starts from the
# committed seeds (fuzz/corpus/<target>) plus what earlier runs on this machine found
# (fuzz/target/corpus/<target>, not committed). A crash stops the stage: its input is saved under
# fuzz/artifacts/<target>/ and printed in base64; fix the parser and add the input as a regression
# unit test next to it.

TB_CARGO_FUZZ_VERSION=0.13.2
TB_FUZZ_TARGETS=(cookies return_to callback_query jwt_header redis_url)

ensure_cargo_fuzz() {
  local root="${CARGO_TARGET_DIR:-target}/tools"
  [[ "$root" = /* ]] || root="$PWD/$root"
  CARGO_FUZZ="$root/bin/cargo-fuzz"
  if [[ "$("$CARGO_FUZZ" --version 2>/dev/null)" != "cargo-fuzz $TB_CARGO_FUZZ_VERSION" ]]; then
    say "installing cargo-fuzz $TB_CARGO_FUZZ_VERSION from crates.io into $root (cargo install, about 2 minutes once)"
    cargo install cargo-fuzz --version "$TB_CARGO_FUZZ_VERSION" --root "$root" --locked --quiet ||
      die "cargo install cargo-fuzz $TB_CARGO_FUZZ_VERSION failed"
  fi
  say "cargo-fuzz: $("$CARGO_FUZZ" --version) at $CARGO_FUZZ"
}

fuzz_stage() {
  local seconds target status
  seconds="${TB_FUZZ_SECONDS:-$([[ "${TB_TEST_LONG:-0}" == 1 ]] && echo 300 || echo 12)}"
  # Its own target directory (fuzz/target): other RUSTFLAGS than the main build.
  RUSTC_BOOTSTRAP=1 "$CARGO_FUZZ" build --sanitizer none || return
  for target in "${TB_FUZZ_TARGETS[@]}"; do
    echo "--- fuzz: $target for ${seconds}s"
    mkdir -p "fuzz/target/corpus/$target"
    status=0
    RUSTC_BOOTSTRAP=1 "$CARGO_FUZZ" run --sanitizer none "$target" \
      "fuzz/target/corpus/$target" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"fuzz/target/$target.log" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|stat::new_units_added)|^#[0-9]+ *DONE' "fuzz/target/$target.log" | tr '\n' ' '
    echo
    if ((status != 0)); then
      tail -n 60 "fuzz/target/$target.log"
      echo "fuzz: $target failed; the crashing input is in fuzz/artifacts/$target/ (log: fuzz/target/$target.log)"
      return "$status"
    fi
  done
}
