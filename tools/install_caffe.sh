#!/usr/bin/env bash
# Build BVLC Caffe (CPU-only by default, Python layers and OpenCV on) into clipq's cache and print
# the build's root directory on stdout. A finished build is reused: the cache key is the source's
# content hash + the patches + the Python/numpy it is built for + the build options.
#
# usage: tools/install_caffe.sh [PYTHON]      PYTHON: interpreter pycaffe is built for (default python3)
# env:   CLIPQ_CAFFE_SRC   tarball path or URL to use instead of the default sources
#        CLIPQ_CAFFE_HOME  build cache (default ~/.cache/clipq/caffe)
#        CLIPQ_CAFFE_GPU=1 CUDA build (CUDA_DIR, CLIPQ_CUDA_ARCH); untested here, see docs/install.md
#        CLIPQ_SKIP_APT=1  never call apt-get (fail if a package is missing)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
. "$here/lib.sh"

CAFFE_COMMIT=9b891540183ddc834a02b2bd81b31afae71b2153
MIRROR="$repo/../shared/third_party/bvlc-caffe-9b89154.tar.gz"
MIRROR_SHA256=a3e38b0605575e5b31d27f618b33ba27d7e3c8c5000cd5a05365a2f4745265e4
# sha256 of `sha256sum` over every file of the commit's tree, sorted by path (see tree_hash):
# the same for the mirror, the GitHub archive or any other tarball of that commit.
TREE_SHA256=0d2b37b063d0a9798181a6c65986bfd21514e7d9943f2d7ec85d214f1e90ea34
GITHUB_URL="https://github.com/BVLC/caffe/archive/$CAFFE_COMMIT.tar.gz"
BROCOLLI=brocolli-caffe==9.0.2
BROCOLLI_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
CAFFE_HOME="${CLIPQ_CAFFE_HOME:-$CLIPQ_CACHE/caffe}"
PYTHON="${1:-python3}"
GPU="${CLIPQ_CAFFE_GPU:-0}"
CAFFE_PKGS=(build-essential patch pkg-config curl ca-certificates
    libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-regex-dev libboost-python-dev
    libgoogle-glog-dev libgflags-dev libprotobuf-dev protobuf-compiler libhdf5-dev libopenblas-dev
    liblmdb-dev libleveldb-dev libsnappy-dev)
# What Caffe links of OpenCV (core, imgproc, imgcodecs, highgui): libopencv-dev would pull ~238 packages.
OPENCV_PKGS=(libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev libopencv-highgui-dev)

tree_hash() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); }
file_hash() { sha256sum "$1" | cut -d' ' -f1; }

# download URL DEST: fetch to a temp file, then rename (no half-written DEST).
download() {
    curl -fsSL --retry 2 --connect-timeout 20 -o "$2.part" "$1" && mv "$2.part" "$2" || { rm -f "$2.part"; return 1; }
}

# Sets SRC_TARBALL, SRC_KIND (bvlc | brocolli) and SRC_DESC.
find_source() {
    mkdir -p "$CAFFE_HOME/downloads"
    if [ -n "${CLIPQ_CAFFE_SRC:-}" ]; then
        SRC_KIND=bvlc SRC_DESC="BVLC Caffe $CAFFE_COMMIT from CLIPQ_CAFFE_SRC=$CLIPQ_CAFFE_SRC"
        case "$CLIPQ_CAFFE_SRC" in
            http://*|https://*)
                SRC_TARBALL="$CAFFE_HOME/downloads/caffe-from-url.tar.gz"
                download "$CLIPQ_CAFFE_SRC" "$SRC_TARBALL" \
                    || die "source" "cannot download CLIPQ_CAFFE_SRC=$CLIPQ_CAFFE_SRC" "check the URL, or unset CLIPQ_CAFFE_SRC";;
            *)  [ -f "$CLIPQ_CAFFE_SRC" ] \
                    || die "source" "CLIPQ_CAFFE_SRC=$CLIPQ_CAFFE_SRC is not a file" "point it at a tarball of BVLC Caffe $CAFFE_COMMIT, or unset it"
                SRC_TARBALL=$(cd "$(dirname "$CLIPQ_CAFFE_SRC")" && pwd)/$(basename "$CLIPQ_CAFFE_SRC");;
        esac
        return
    fi
    if [ -f "$MIRROR" ]; then
        [ "$(file_hash "$MIRROR")" = "$MIRROR_SHA256" ] \
            || die "source" "the offline mirror $MIRROR is corrupt (sha256 differs from $MIRROR_SHA256)" \
                   "restore the file, or set CLIPQ_CAFFE_SRC to another tarball of commit $CAFFE_COMMIT"
        SRC_TARBALL=$(cd "$(dirname "$MIRROR")" && pwd)/$(basename "$MIRROR")
        SRC_KIND=bvlc SRC_DESC="BVLC Caffe $CAFFE_COMMIT (offline mirror $SRC_TARBALL)"
        return
    fi
    SRC_TARBALL="$CAFFE_HOME/downloads/caffe-$CAFFE_COMMIT.tar.gz"
    if [ -f "$SRC_TARBALL" ] || download "$GITHUB_URL" "$SRC_TARBALL"; then
        SRC_KIND=bvlc SRC_DESC="BVLC Caffe $CAFFE_COMMIT ($GITHUB_URL)"
        return
    fi
    log "WARNING: neither the offline mirror nor GitHub is reachable; falling back to the PyPI sdist $BROCOLLI."
    log "WARNING: $BROCOLLI is NOT pristine BVLC Caffe but an older rc3-lineage fork with extra SSD layers."
    SRC_TARBALL="$CAFFE_HOME/downloads/brocolli-caffe-9.0.2.tar.gz"
    if [ ! -f "$SRC_TARBALL" ]; then
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: "$BROCOLLI" -d "$CAFFE_HOME/downloads" >&2 \
            || die "source" "no Caffe source reachable: no mirror at $MIRROR, no GitHub, no PyPI" \
                   "set CLIPQ_CAFFE_SRC to a tarball of BVLC Caffe $CAFFE_COMMIT"
    fi
    [ "$(file_hash "$SRC_TARBALL")" = "$BROCOLLI_SHA256" ] || { rm -f "$SRC_TARBALL";
        die "source" "the download of $BROCOLLI is corrupt (sha256 mismatch); it was deleted" "rerun"; }
    SRC_KIND=brocolli SRC_DESC="$BROCOLLI from PyPI (NOT pristine BVLC: rc3-lineage fork with SSD layers)"
}

# Everything that changes the build goes into its cache key.
build_key() {
    local py_id
    py_id=$("$PYTHON" -c 'import sys, numpy; print(sys.version.split()[0], numpy.__version__.split(".")[0])') \
        || die "python" "$PYTHON cannot import numpy (pycaffe is built against its headers)" "install numpy into $PYTHON"
    { echo "$SRC_KIND $(file_hash "$SRC_TARBALL")"; cat "$here/patches/$SRC_KIND"/*.patch;
      echo "$py_id gpu=$GPU opencv=$OPENCV";
      declare -f write_makefile_config; } | sha256sum | cut -c1-16
}

write_makefile_config() {
    local py_inc np_inc py_libdir py_ver opencv_inc=
    py_inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    np_inc=$("$PYTHON" -c 'import numpy; print(numpy.get_include())')
    py_libdir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
    py_ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$OPENCV" = 1 ] && opencv_inc=" /usr/include/opencv4"  # Debian's OpenCV 4 headers are not under /usr/include
    {
        echo "# written by clipq tools/install_caffe.sh"
        if [ "$GPU" = 1 ]; then
            echo "CUDA_DIR := ${CUDA_DIR:-/usr/local/cuda}"
            echo "CUDA_ARCH := ${CLIPQ_CUDA_ARCH:--gencode arch=compute_61,code=sm_61 -gencode arch=compute_70,code=sm_70 -gencode arch=compute_75,code=sm_75 -gencode arch=compute_80,code=sm_80}"
        else
            echo "CPU_ONLY := 1"
        fi
        echo "USE_OPENCV := $OPENCV"
        # 3 (for OpenCV >= 3, Debian 12 has 4.6) adds opencv_imgcodecs, where imread/imdecode live.
        [ "$OPENCV" = 1 ] && echo "OPENCV_VERSION := 3"
        echo "USE_LMDB := 1"
        echo "USE_LEVELDB := 1"
        echo "BLAS := open"
        echo "WITH_PYTHON_LAYER := 1"
        echo "PYTHON_INCLUDE := $py_inc $np_inc"
        echo "PYTHON_LIB := $py_libdir"
        echo "PYTHON_LIBRARIES := boost_python${py_ver/./} python$py_ver"
        echo "INCLUDE_DIRS := \$(PYTHON_INCLUDE) /usr/local/include /usr/include/hdf5/serial$opencv_inc"
        echo "LIBRARY_DIRS := \$(PYTHON_LIB) /usr/local/lib /usr/lib /usr/lib/x86_64-linux-gnu/hdf5/serial"
        echo "LINKFLAGS := -Wl,-rpath,$py_libdir"
        echo "BUILD_DIR := build"
        echo "DISTRIBUTE_DIR := distribute"
        echo "Q ?= @"
    } > "$1/Makefile.config"
}

check_python() {
    local shared ver
    shared=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED"))') \
        || die "python" "cannot run $PYTHON" "pass a working Python 3 as the first argument"
    [ "$shared" = 1 ] || die "python" "$PYTHON has no shared libpython, which pycaffe links against" \
                             "use a Python built with --enable-shared"
    ver=$("$PYTHON" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    ls /usr/lib/*/libboost_python"$ver".so >/dev/null 2>&1 || die "apt packages" \
        "no libboost_python$ver.so: Debian's libboost-python-dev has no build for this Python" "use Python 3.11 (Debian 12)"
}

unpack() {  # unpack TARBALL DIR: the tarball's single top directory becomes DIR
    mkdir -p "$2"
    tar -xzf "$1" -C "$2" --strip-components=1 || { rm -rf "$2";
        die "source" "cannot unpack $1 (corrupt, or not a .tar.gz)" \
            "replace it with a good copy (files under $CAFFE_HOME/downloads may just be deleted), then rerun"; }
}

apply_patches() {
    local p
    for p in "$here/patches/$SRC_KIND"/*.patch; do
        log "patch: $(basename "$p"): $(head -1 "$p" | sed 's/^# //')"
        patch -d "$1" -p1 --forward --batch --quiet < "$p" >&2 || { rm -rf "$1";
            die "patch" "$p does not apply to $SRC_DESC" "update that patch for this source tree, then rerun"; }
    done
    if [ "$SRC_KIND" = brocolli ]; then
        # Its sdist ships protobuf files generated by an older protoc; make regenerates them.
        rm -f "$1/include/caffe/proto/caffe.pb.h" "$1/src/caffe/proto/caffe.pb.cc" "$1/python/caffe/proto/caffe_pb2.py"
    fi
}

write_stamp() {  # write_stamp FILE KEY: what `clipq doctor` reports about this build
    {
        echo "source=$SRC_DESC"
        echo "source_kind=$SRC_KIND"
        [ "$SRC_KIND" = bvlc ] && echo "commit=$CAFFE_COMMIT" || echo "commit=unknown (not pristine BVLC)"
        echo "key=$2"
        echo "gpu=$GPU"
        echo "opencv=$OPENCV"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$1"
}

main() {
    log "step 1/5: Debian packages for Caffe"
    apt_ensure "${CAFFE_PKGS[@]}"
    check_python
    log "step 2/5: Caffe source"
    find_source
    # OpenCV for BVLC only. brocolli's tree has OpenCV 2 C names in more files than patch 03 fixes
    # (CV_BGR2HSV, CV_FILLED, CV_FOURCC, CV_CAP_PROP_*; its own shims are for CV_VERSION_MAJOR == 3 only)
    # and always links opencv_videoio: that last resort builds without OpenCV (convert_imageset and
    # ImageData then stop with "requires OpenCV"), and its stamp says opencv=0.
    OPENCV=0
    if [ "$SRC_KIND" = bvlc ]; then
        OPENCV=1
        apt_ensure "${OPENCV_PKGS[@]}"
    fi
    local key dir
    key=$(build_key)
    dir="$CAFFE_HOME/$SRC_KIND-$key"
    if [ -f "$dir/.clipq-built" ]; then
        log "Caffe already built: $dir ($SRC_DESC)"
        echo "$dir"; return
    fi
    log "source: $SRC_DESC"
    rm -rf "$dir.partial"
    unpack "$SRC_TARBALL" "$dir.partial"
    if [ "$SRC_KIND" = bvlc ]; then
        [ "$(tree_hash "$dir.partial")" = "$TREE_SHA256" ] || { rm -rf "$dir.partial";
            die "source" "$SRC_TARBALL is not the tree of BVLC Caffe commit $CAFFE_COMMIT (content hash differs)" \
                "delete $SRC_TARBALL if it is a download, or set CLIPQ_CAFFE_SRC to a tarball of that commit"; }
    fi
    log "step 3/5: patches for modern Debian (tools/patches/$SRC_KIND)"
    apply_patches "$dir.partial"
    write_makefile_config "$dir.partial"
    log "step 4/5: make -j$(nproc) lib tools pycaffe (a few minutes; log: $dir.partial/build.log)"
    make -C "$dir.partial" -j"$(nproc)" lib tools pycaffe > "$dir.partial/build.log" 2>&1 || {
        tail -n 30 "$dir.partial/build.log" >&2
        die "build" "make failed; full log in $dir.partial/build.log" "fix the cause shown above, then rerun (the partial build is discarded)"; }
    log "step 5/5: check that pycaffe imports"
    PYTHONPATH="$dir.partial/python" "$PYTHON" -c 'import caffe, caffe.io' >&2 \
        || die "check" "the build finished but 'import caffe' fails" "see the error above; rerun after fixing"
    write_stamp "$dir.partial/.clipq-built" "$key"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    log "Caffe built: $dir"
    echo "$dir"
}

main
