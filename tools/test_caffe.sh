#!/usr/bin/env bash
# `make test-caffe`: BVLC Caffe's own C++ unit tests (gtest) for the Caffe that `make install` built.
# Builds them in the cached build tree (its Makefile.config is there; later runs find them built), then
# runs them from the Caffe root (they read src/caffe/test/test_data, examples/images) as Caffe's
# `make runtest` does: GPU tests filtered out in a CPU-only build. Prints the pass count; exits
# non-zero when a test fails.
#
# env: VENV (default <repo>/.venv), and the CLIPQ_* variables of tools/install_caffe.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
. "$here/lib.sh"
VENV="${VENV:-$repo/.venv}"

# Only what Caffe's `runtest` runs, its test_all.testbin (BUILD_DIR := build puts it in .build_release):
# `make test` would also link one binary per test file, compiling test_caffe_main.cpp 67 more times
# (11 of its 24 minutes on 2 busy cores).
TEST_BIN=.build_release/test/test_all.testbin

build_tests() {  # build_tests ROOT
    log "test-caffe 1/2: make -j$(nproc) $TEST_BIN in $1 (the first time ~13 min on 2 cores; log: $1/test-build.log)"
    make -C "$1" -j"$(nproc)" "$TEST_BIN" > "$1/test-build.log" 2>&1 || {
        tail -n 30 "$1/test-build.log" >&2
        die "test build" "make $TEST_BIN failed in $1; full log in $1/test-build.log" "fix the cause shown above, then make test-caffe"; }
}

run_tests() {  # run_tests ROOT: the flags of Caffe's runtest target (Makefile: TEST_FILTER for CPU_ONLY)
    local log_file="$1/test-run.log" rc=0
    log "test-caffe 2/2: $TEST_BIN --gtest_shuffle --gtest_filter=-*GPU* (log: $log_file)"
    (cd "$1" && "$TEST_BIN" --gtest_shuffle --gtest_filter='-*GPU*') > "$log_file" 2>&1 || rc=$?
    # gtest's summary: "[==========] N tests from M test cases ran.", "[  PASSED  ] N tests.", "[  FAILED  ] ..."
    grep -E '^(Note: Randomizing|\[==========\] [0-9]+ tests? from|\[  PASSED  \]|\[  FAILED  \]|  YOU HAVE)' "$log_file" || true
    [ "$rc" = 0 ] && return
    tail -n 20 "$log_file" >&2
    die "caffe tests" "test_all.testbin exited $rc (failed tests and the output's end above; all of it in $log_file)" \
        "rerun one test with: cd $1 && $TEST_BIN --gtest_filter=<name>"
}

caffe_root=$("$here/install_caffe.sh" "$VENV/bin/python")
build_tests "$caffe_root"
run_tests "$caffe_root"
