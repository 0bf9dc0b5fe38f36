#!/usr/bin/env bash
# Build the fuzz targets with cargo-afl (installed if missing), make the seed corpora and
# run each target for SECONDS_PER_TARGET (default 60) seconds, one after another. Fails if
# AFL found any crash or hang; prints the executions of each target.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# FUZZ_HANG_MS (default 1000) is how long one input may take before AFL calls it a hang.
# FUZZ_OUT (default /tmp/img-fuzz) holds the seeds and AFL's findings; CARGO_TARGET_DIR is
# honoured (default fuzz/target), FUZZ_PROFILE picks the cargo profile (default release).
set -euo pipefail

secs="${1:-60}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(open_read check qcow2_parts diskboot virtio_blk nbd_server)
out="${FUZZ_OUT:-/tmp/img-fuzz}"
target_dir="${CARGO_TARGET_DIR:-$here/target}"
profile="${FUZZ_PROFILE:-release}"

cargo afl --version >/dev/null 2>&1 || cargo install --locked cargo-afl
cargo afl build --profile "$profile"
./make-seeds.sh "$out/seeds" >/dev/null

failed=0
for t in "${targets[@]}"; do
    rm -rf "$out/$t"
    # -t: an input taking over FUZZ_HANG_MS (1 s) is a hang; -m: over 2 GiB of address
    # space is a crash.
    AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
        cargo afl fuzz -i "$out/seeds/$t" -o "$out/$t" -t "${FUZZ_HANG_MS:-1000}" -m 2048 -V "$secs" \
        "$target_dir/$profile/$t" >"$out/$t.log" 2>&1 || {
        echo "$t: afl-fuzz failed, see $out/$t.log"
        tail -5 "$out/$t.log"
        failed=1
        continue
    }
    stats="$out/$t/default/fuzzer_stats"
    get() { sed -n "s/^$1 *: *//p" "$stats"; }
    crashes=$(find "$out/$t/default/crashes" -type f -name 'id:*' | wc -l)
    hangs=$(find "$out/$t/default/hangs" -type f -name 'id:*' | wc -l)
    echo "$t: $(get execs_done) executions in $(get run_time) s ($(get execs_per_sec)/s)," \
        "corpus $(get corpus_count), crashes $crashes, hangs $hangs"
    if [ "$crashes" -gt 0 ] || [ "$hangs" -gt 0 ]; then
        echo "  findings in $out/$t/default/{crashes,hangs}"
        failed=1
    fi
done
exit "$failed"
