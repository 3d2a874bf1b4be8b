#!/usr/bin/env bash
# `make install`: Debian packages, the .venv with pinned Python packages, BVLC Caffe (built once
# into the cache), and the glue that makes pycaffe, clipq and the plugin layers importable.
# Idempotent: every step is skipped when its result is already there.
#
# env: PYTHON (base interpreter, default python3), VENV (default <repo>/.venv), and the CLIPQ_*
#      variables of tools/install_caffe.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
. "$here/lib.sh"
VENV="${VENV:-$repo/.venv}"

log "install 1/5: Debian packages (Fashion-MNIST; graphviz for pycaffe's caffe.draw; Open MPI for clipq train --mpi)"
apt_ensure dataset-fashion-mnist graphviz openmpi-bin libopenmpi-dev

log "install 2/5: virtualenv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV" \
        || die "virtualenv" "cannot create $VENV with ${PYTHON:-python3}" "rm -rf $VENV; make install"
fi
req_hash=$(cat "$repo/requirements.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.clipq-requirements" 2>/dev/null)" != "$req_hash" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$repo/requirements.txt" >&2 \
        || die "python packages" "pip could not install requirements.txt into $VENV" "check access to PyPI, then make install"
    echo "$req_hash" > "$VENV/.clipq-requirements"
fi

log "install 3/5: BVLC Caffe"
caffe_root=$("$here/install_caffe.sh" "$VENV/bin/python")

# write_wrapper NAME COMMAND...: $VENV/bin/NAME runs COMMAND with its own arguments appended. Caffe's
# embedded Python (Python layers) finds its packages through the first python3 on PATH, so the venv
# goes first; layers/ holds clipq's Python layers. Written to a temp file, then renamed.
write_wrapper() {
    local name=$1
    shift
    cat > "$VENV/bin/$name.tmp" <<EOF
#!/usr/bin/env bash
# BVLC Caffe's \`$name\` (built by clipq's tools/install_caffe.sh), with clipq's venv and layers.
export PATH="$VENV/bin:\$PATH"
export PYTHONPATH="$repo/layers:$caffe_root/python\${PYTHONPATH:+:\$PYTHONPATH}"
exec $(printf '"%s" ' "$@")"\$@"
EOF
    chmod +x "$VENV/bin/$name.tmp"
    mv "$VENV/bin/$name.tmp" "$VENV/bin/$name"
}

log "install 4/5: pycaffe, clipq and layers/ on the venv's path; Caffe's tools in .venv/bin; cache -> $CLIPQ_CACHE"
mkdir -p "$CLIPQ_CACHE"
ln -sfn "$CLIPQ_CACHE" "$repo/cache"  # prototxts and solvers name data and models relative to the repo root
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$caffe_root/python" "$repo/layers" > "$site/clipq-caffe.pth"
for tool in "$caffe_root"/build/tools/*.bin; do  # caffe, convert_imageset, compute_image_mean, ...
    name=$(basename "$tool" .bin)
    write_wrapper "$name" "$caffe_root/build/tools/$name"
done
write_wrapper draw_net.py "$VENV/bin/python" "$caffe_root/python/draw_net.py"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2 \
    || die "clipq package" "pip install -e $repo failed" "make install"

log "install 5/5: clipq doctor"
"$VENV/bin/clipq" doctor >&2 || die "doctor" "clipq doctor found a problem (see above)" "make install"
