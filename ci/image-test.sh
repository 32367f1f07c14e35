#!/usr/bin/env bash
# `make image-test`: build the project's Dockerfile offline with buildah, run the FROM scratch
# image with podman and run one job through it over HTTP; then the same for
# examples/Dockerfile.copy-from (into a Debian base: the job runs the base's own python3) and
# examples/Dockerfile.tarball (the release tarball from `make dist`, served on 127.0.0.1).
# No Docker engine and no registry: the base images are made locally with debootstrap
# (ci/make-rootfs.sh) and tagged as the names the Dockerfiles expect. Root only.
#
# Environment: JOBD_SOURCE (default jobd.py) is built as jobd.py; KEEP_IMAGES=0 removes the
# container storage afterwards (default: keep it in .cache/containers, for warm runs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" -eq 0 ] || { echo "image-test: needs root (buildah/podman with runc)" >&2; exit 1; }
t0=$(date +%s.%N)
say() { printf '[image-test %5.1fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }

missing=()
for tool in buildah podman runc debootstrap bc; do command -v $tool >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    bash ci/apt-install.sh --recommends "${missing[@]}"
fi

# --- private container storage and settings (see shared notes: containers.md) ---
state="$repo/.cache/containers"
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/jobd-image-test.XXXXXX")
mkdir -p "$state/storage"
cat > "$run_dir/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$run_dir/runroot"
graphroot = "$state/storage"
EOF
cat > "$run_dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF="$run_dir/storage.conf" CONTAINERS_CONF="$run_dir/containers.conf"
export BUILDAH_ISOLATION=chroot
containers=()
server_pid=
unmount_below() {   # lazily unmount everything mounted at or below $1, deepest first
    awk -v p="$1" '$5 == p || index($5, p "/") == 1 {print $5}' /proc/self/mountinfo \
        | sort -r | while read -r point; do umount -l "$point" 2>/dev/null || true; done
}
cleanup() {
    for c in "${containers[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1 || true; done
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    buildah rm --all >/dev/null 2>&1 || true
    podman unmount --all >/dev/null 2>&1 || true
    if [ "${KEEP_IMAGES:-1}" = 0 ]; then
        podman system reset -f >/dev/null 2>&1 || true
    fi
    # container storage leaves its layer mounts (and a bind of its overlay dir) behind
    unmount_below "$state"
    unmount_below "$run_dir"
    if [ "${KEEP_IMAGES:-1}" = 0 ]; then rm -rf "$state"; fi
    rm -rf "$run_dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ca=/etc/ssl/certs/ca-certificates.crt
build() {   # build CONTEXT TAG [buildah args...]
    local context=$1 tag=$2; shift 2
    local extra=()
    [ -f "$ca" ] && extra+=(-v "$ca:$ca:ro" --build-arg "PIP_CERT=$ca")
    local log="$run_dir/build-${tag//[^A-Za-z0-9]/_}.log"
    if ! buildah build --isolation chroot --pull=never --network host --layers "${extra[@]}" \
            -t "$tag" "$@" "$context" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        return 1
    fi
}

# run_image NAME IMAGE CHECK-SCRIPT: start it, run one job, SIGTERM it, require exit 0
run_image() {
    local name=$1 image=$2 script=$3 port
    port=$(free_port)
    podman rm -f "$name" >/dev/null 2>&1 || true
    containers+=("$name")
    podman run -d --name "$name" --network host "$image" --host 127.0.0.1 --port "$port" >/dev/null
    if ! python3 tests/jobd_client.py "http://127.0.0.1:$port" --id "$name-job" --timeout 60 \
            --script "$script" --expect-stdout "ok"; then
        podman logs "$name" >&2 || true
        return 1
    fi
    podman stop -t 20 "$name" >/dev/null
    local code
    code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
    [ "$code" = 0 ] || { echo "$name: exit status $code after SIGTERM" >&2; podman logs "$name" >&2; return 1; }
    say "$name: job done over HTTP, SIGTERM -> exit 0"
}

# --- base images: Debian minbase (+python3) and a stand-in for python:3.11-slim ---
if ! podman image exists localhost/debian-min:bookworm; then
    rootfs=$(bash ci/make-rootfs.sh)
    say "import $rootfs as localhost/debian-min:bookworm"
    tar --numeric-owner -C "$rootfs" -c . | podman import -q - localhost/debian-min:bookworm >/dev/null
fi
if ! podman image exists docker.io/library/python:3.11-slim; then
    say "make the stand-in for python:3.11-slim"
    mkdir -p "$run_dir/python-base"
    cat > "$run_dir/python-base/Dockerfile" <<'EOF'
FROM localhost/debian-min:bookworm
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
    build "$run_dir/python-base" docker.io/library/python:3.11-slim
fi

# --- the project's Dockerfile, from the files git knows (+ JOBD_SOURCE as jobd.py) ---
context="$run_dir/context"
mkdir -p "$context"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$context/" 2>/dev/null || true
if [ -n "${JOBD_SOURCE:-}" ]; then cp "$JOBD_SOURCE" "$context/jobd.py"; fi
[ -f "$context/jobd.py" ] || { echo "image-test: no jobd.py to build (set JOBD_SOURCE)" >&2; exit 1; }
say "buildah build Dockerfile -> localhost/jobd:test"
build "$context" localhost/jobd:test --build-arg "SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}"
size=$(podman image inspect -f '{{.Size}}' localhost/jobd:test)
say "scratch image built: $((size / 1024)) KiB"
# FROM scratch has no shell: the job brings a static program (when a C compiler is at hand)
# and names it as run.sh's interpreter.
run_scratch_job() {
    local port name=jobd-scratch hello="$run_dir/hello"
    port=$(free_port)
    podman rm -f "$name" >/dev/null 2>&1 || true
    containers+=("$name")
    podman run -d --name "$name" --network host localhost/jobd:test --host 127.0.0.1 --port "$port" >/dev/null
    printf '#include <stdio.h>\nint main(void){puts("ok");return 0;}\n' > "$hello.c"
    "$(command -v musl-gcc || command -v cc || echo false)" -static -Os -o "$hello" "$hello.c" 2>/dev/null || rm -f "$hello"
    python3 - "$port" "$hello" <<'EOF' || { podman logs "$name" >&2; exit 1; }
import os, sys
sys.path.insert(0, "tests")
import jobd_client
url = "http://127.0.0.1:%s" % sys.argv[1]
jobd_client.wait_until_up(url, 30)
if os.path.exists(sys.argv[2]):   # run.sh's interpreter is the static program of the job
    job, files = jobd_client.run_job(url, "scratch-job", "#!./hello\n",
                                     files={"hello": open(sys.argv[2], "rb").read()}, timeout=60)
    ok = job["Status"] == "SUCCESS" and files.get("jobd.stdout") == b"ok\n"
else:   # no compiler: a shell script cannot run in FROM scratch, but jobd must answer with its files
    job, files = jobd_client.run_job(url, "scratch-job", "#!/bin/sh\necho ok\n", timeout=60)
    ok = job["Status"] == "FAILED" and "run.sh" in files
print("scratch job: %s (%s)" % (job["Status"], job.get("Message")))
sys.exit(0 if ok else 1)
EOF
    podman stop -t 20 "$name" >/dev/null
    [ "$(podman inspect -f '{{.State.ExitCode}}' "$name")" = 0 ] || { podman logs "$name" >&2; exit 1; }
    say "$name: job answered over HTTP, SIGTERM -> exit 0"
}
run_scratch_job

# --- examples/Dockerfile.copy-from into a Debian base; the job uses the base's python3 ---
buildah tag localhost/jobd:test ghcr.io/rvhonorato/jobd:latest
say "buildah build examples/Dockerfile.copy-from"
build "$repo/examples" localhost/jobd-copy-from:test -f "$repo/examples/Dockerfile.copy-from" \
    --build-arg BASE=localhost/debian-min:bookworm
run_image jobd-copy-from localhost/jobd-copy-from:test \
    "$(printf '#!/bin/sh\npython3 -c "import zlib; print(\\"ok\\", zlib.crc32(b\\"x\\"))"\n')"

# --- examples/Dockerfile.tarball with the release tarball (make dist), served on loopback ---
version=$(sed -n "s/^__version__ *= *[\"']\([^\"']*\)[\"'].*/\1/p" "$context/jobd.py")
tarball="dist/jobd_${version}_linux_amd64.tar.gz"
if [ -f "$tarball" ]; then
    mkdir -p "$run_dir/releases/$version"
    cp "$tarball" "$run_dir/releases/$version/"
    port=$(free_port)
    python3 -m http.server --bind 127.0.0.1 --directory "$run_dir/releases" "$port" >/dev/null 2>&1 &
    server_pid=$!
    python3 -c "import sys; sys.path.insert(0, 'tests'); import jobd_client; jobd_client.wait_until_up('http://127.0.0.1:$port', 10)"
    say "buildah build examples/Dockerfile.tarball ($tarball)"
    build "$repo/examples" localhost/jobd-tarball:test -f "$repo/examples/Dockerfile.tarball" \
        --build-arg BASE=localhost/debian-min:bookworm --build-arg "JOBD_VERSION=$version" \
        --build-arg "JOBD_RELEASES=http://127.0.0.1:$port"
    run_image jobd-tarball localhost/jobd-tarball:test "$(printf '#!/bin/sh\necho ok\n')"
else
    say "skip examples/Dockerfile.tarball: no $tarball (run make dist first)"
fi
say "image test passed"
