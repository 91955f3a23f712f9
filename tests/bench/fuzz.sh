#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/fuzz_targets/) and runs each for a while.
#
#   tests/bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Every target by default, 600 s each. The build is what `cargo fuzz build`
# does, without cargo-fuzz and without AddressSanitizer (safe Rust needs
# none; libFuzzer still catches panics, hangs and runaway memory): release,
# SanitizerCoverage instrumentation, debug assertions and overflow checks,
# `--cfg fuzzing`, into fuzz/target. libfuzzer-sys compiles libFuzzer, which
# needs a C++ compiler (g++, see tests/install-deps.sh).
#
# Each target starts from its checked-in corpus, fuzz/corpus/TARGET/, copied
# to a working corpus, fuzz/target/corpus/TARGET/, which then gains what the
# run finds (fresh every run; copy inputs worth keeping into fuzz/corpus).
# A crash, hang (FUZZ_TIMEOUT seconds for one input, default 10) or memory
# blow-up (FUZZ_RSS_MB, default 2048) is written to fuzz/target/artifacts/
# TARGET/; the script prints each target's runs, coverage and findings, and
# exits non-zero if any target found something. Reproduce a finding with
#   fuzz/target/<host triple>/release/TARGET FILE
# Extra libFuzzer flags can be given in FUZZ_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-600}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^lode-fuzz$')
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets <<<"$all"
fi
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$all"; then
        echo "unknown target $t (targets: $(echo $all))" >&2
        exit 2
    fi
done

root=$PWD
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=$root/fuzz/target
# cargo-fuzz's flags minus AddressSanitizer. `--target` keeps them off
# build scripts and proc macros, which are not linked with libFuzzer.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
unset RUSTDOCFLAGS CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

build_start=$SECONDS
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" "${bins[@]}"
echo "fuzz build: $((SECONDS - build_start)) s"

bin_dir=$CARGO_TARGET_DIR/$host/release
failed=()
summary=()
for t in "${targets[@]}"; do
    work=$CARGO_TARGET_DIR/corpus/$t
    artifacts=$CARGO_TARGET_DIR/artifacts/$t
    log=$CARGO_TARGET_DIR/logs/$t.log
    rm -rf "$work"
    mkdir -p "$work" "$artifacts" "$(dirname "$log")"
    if [[ -d fuzz/corpus/$t ]]; then
        cp fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
    fi
    echo "== $t: ${seconds} s from $(find "$work" -type f | wc -l) inputs"
    status=0
    # shellcheck disable=SC2086  # FUZZ_FLAGS is a list of flags
    "$bin_dir/$t" -max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-10}" \
        -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" ${FUZZ_FLAGS:-} "$work" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' "$log" | tail -1 || true)
    found=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    if ((status != 0)) || [[ -n $found ]]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -5 || true
        echo "   log: $log"
        line="$t: FOUND (exit $status) ${found:-no input written}"
        failed+=("$t")
    else
        line="$t: ok, ${runs:-?} runs (${rate:-?}/s), ${cov:-no coverage line}, peak ${rss:-?} MB"
    fi
    echo "   $line"
    summary+=("$line")
done

echo "== fuzz summary (${seconds} s per target, build and runs $((SECONDS - build_start)) s)"
printf '   %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "findings in: ${failed[*]}" >&2
    exit 1
fi
