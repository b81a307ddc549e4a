#!/bin/bash
# Fuzz smoke run: builds every cargo-fuzz target and runs each for a short time from the seed corpus
# (fuzz/corpus/<target>), failing on any crash, leak or timeout. The long runs and their numbers are in
# docs/reliability.md. Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); libFuzzer needs nightly
# compiler flags, which RUSTC_BOOTSTRAP allows on the stable toolchain installed here.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-15}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo fuzz build -O
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in $(cargo fuzz list); do
    mkdir -p "$work/$t"
    echo "fuzz smoke: $t for ${secs}s"
    # New inputs go to a scratch corpus; the committed seeds are only read.
    cargo fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$work/" -print_final_stats=1 \
        2>&1 | grep -E "^(stat::number_of_executed_units|#[0-9]+ *DONE)|ERROR|SUMMARY" || true
    # cargo fuzz exits non-zero on a finding; pipefail reports it, but grep's || true hides it: check.
    if ls "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-* >/dev/null 2>&1; then
        echo "fuzz smoke: $t found a failing input:" >&2
        ls "$work" >&2
        exit 1
    fi
done
echo "fuzz smoke: every target ran ${secs}s without a finding"
