#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/fuzz_targets for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
#   scripts/fuzz.sh --runs N [--record FILE] [TARGET...]
#
# --runs N runs each target for N executions instead of a time (the long
# runs recorded in fuzz/RESULTS.md); --record FILE appends one table row per
# target (date, commit, executions, seconds, crashes) to FILE.
#
# Exits non-zero when a target crashes (the input is left in
# fuzz/artifacts/<target>/). Installs cargo-fuzz from crates.io if missing.
# cargo-fuzz passes nightly-only -Z flags (sanitizers, coverage); on a
# stable toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them.
# New inputs found go to a scratch directory; the committed seed corpus in
# fuzz/corpus/<target>/ is only read (regenerate it with fuzz/gen_corpus.py).
# The per-input timeout is generous (60 s): on a loaded 2-core machine a
# 10 s alarm fired on an input that runs in microseconds.
set -euo pipefail

secs=60
runs=""
record=""
only=()
while (($#)); do
    case "$1" in
        --runs) runs="${2:-}"; shift 2 ;;
        --record) record="${2:-}"; shift 2 ;;
        -*) echo "usage: $0 [SECONDS_PER_TARGET] | --runs N [--record FILE] [TARGET...]" >&2; exit 2 ;;
        *)
            if [ -z "$runs" ] && [[ "$1" =~ ^[0-9]+$ ]]; then secs="$1"; else only+=("$1"); fi
            shift
            ;;
    esac
done
case "$secs$runs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] | --runs N [--record FILE] [TARGET...]" >&2; exit 2 ;;
esac
if [ -n "$runs" ]; then
    limit=(-runs="$runs")
    what="$runs executions"
else
    limit=(-max_total_time="$secs")
    what="${secs}s"
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

targets=("${only[@]}")
if ((${#targets[@]} == 0)); then
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

# One build for all targets, so build time is not taken from fuzzing time.
cargo fuzz build --release

failed=()
summary=()
for t in "${targets[@]}"; do
    echo "fuzz.sh: $t for $what" >&2
    mkdir -p "$scratch/$t"
    start=$(date +%s)
    crashed=0
    if ! cargo fuzz run --release "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        "${limit[@]}" -rss_limit_mb=2048 -timeout=60 2>&1 | tee "$scratch/$t.log" >&2; then
        failed+=("$t")
        crashed=1
    fi
    took=$(($(date +%s) - start))
    done_runs=$(grep -o 'Done [0-9]* runs' "$scratch/$t.log" | tail -n 1 | awk '{print $2}')
    summary+=("$t: ${done_runs:-?} executions in ${took}s")
    if [ -n "$record" ]; then
        printf '| %s | %s | %s | %s | %s | %s |\n' "$(date -u +%Y-%m-%d)" \
            "$(git rev-parse --short HEAD)" "$t" "${done_runs:-?}" "$took" "$crashed" >>"$record"
    fi
done

printf 'fuzz.sh: %s\n' "${summary[@]}" >&2
if ((${#failed[@]})); then
    echo "fuzz.sh: FAILED (crash, or build error above): ${failed[*]} (crash inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran $what each without a crash" >&2
