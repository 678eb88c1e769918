#!/usr/bin/env bash
# The server image, built and run for real, with podman (no Docker engine needed).
#
#   scripts/image_smoke.sh          (root, or sudo; .ci/run runs it before the test suite)
#
# 1. A Debian bookworm base with Python 3.11, made by debootstrap from the Debian mirror apt uses
#    here and imported into podman: no image registry is needed.
# 2. The CPU image from the Dockerfile on that base, its pip configured as this machine's (pip
#    config list). torch comes from the CPU wheel pip finds here, served to the build as a local
#    index (TORCH_INDEX_URL); where pip finds none, from the Dockerfile's default index.
# 3. The image run as Kubernetes runs it: read-only root filesystem, UID/GID 10001, the store on a
#    volume, /tmp a tmpfs, host networking on free loopback ports. From outside, with the thin
#    client in a virtual environment: gRPC health, /metrics, one analysis (its blobs land in the
#    volume).
# 4. The drain: a longer analysis in flight, SIGTERM; the call completes after the server logged
#    the drain, and the container exits 0 within the grace period.
#
# Needs python3 with venv, a Debian mirror and PyPI (or the indexes pip is configured with). On
# two cores: 2.5 minutes on a fresh machine, 1 with the cache an earlier run left (6 and 2 with the
# cores busy). Without podman, runc and debootstrap it installs them with apt-get; where that
# cannot be (no apt-get) it skips: a message and exit 0. Every other failure is an error (exit 1).
#
# Environment:
#   IMAGE_SMOKE_CACHE  where the base image and podman's build layers stay between runs on this
#                      machine, in a podman store of their own (default
#                      ${XDG_CACHE_HOME:-~/.cache}/curvscope-image-smoke); 0: keep nothing. The
#                      cache is wiped when the base is a week old or the store outgrows 12 GB.
#   IMAGE_SMOKE_BASE   a Python 3.11 image podman can pull, instead of the debootstrap base
#   IMAGE_SMOKE_MIRROR the Debian mirror for debootstrap (default: the one apt uses, else
#                      deb.debian.org)
# Containers, volumes, the image it built and temporary files are removed on every exit; the
# cache keeps the base and the layers of the last build only. The machine's own podman store is
# not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

log() { printf '[image-smoke %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "needs root (podman, debootstrap) and there is no sudo"
    exec sudo --preserve-env env "PATH=$PATH" bash "$repo/scripts/$(basename "$0")" "$@"
fi

# --- podman, runc, debootstrap ----------------------------------------------------------------
needed=()
command -v podman >/dev/null || needed+=(podman)
command -v runc >/dev/null || needed+=(runc)
[ -n "${IMAGE_SMOKE_BASE:-}" ] || command -v debootstrap >/dev/null || needed+=(debootstrap)
if [ ${#needed[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
        log "SKIPPED: ${needed[*]} missing and no apt-get to install them; the image was not built"
        exit 0
    fi
    log "installing ${needed[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${needed[@]}" >/dev/null
fi

# --- the podman store: cached between runs, or temporary ----------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/curvscope-image-smoke.XXXXXX")
chmod 0755 "$work"
cache=${IMAGE_SMOKE_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/curvscope-image-smoke}
[ "$cache" != 0 ] && [ -n "$cache" ] || cache=""
store=${cache:-$work}/store  # images, layers, volumes
run=${cache:-$work}/run      # podman's run-time state (what /run holds for the system's podman)
mkdir -p "$store"
if [ -n "$cache" ]; then
    exec 9>"$cache/lock"
    flock 9  # one run at a time per cache
    # /run is emptied by a reboot, and podman then refreshes its state: so is this one.
    boot=$(cat /proc/sys/kernel/random/boot_id)
    if [ "$(cat "$cache/boot_id" 2>/dev/null)" != "$boot" ]; then
        rm -rf "$run" && echo "$boot" >"$cache/boot_id"
    fi
fi
podman_flags=(--root "$store/root" --runroot "$run/storage" --tmpdir "$run/libpod"
              --volumepath "$store/volumes" --storage-driver overlay --runtime runc
              --cgroup-manager cgroupfs --events-backend file)
pm() { podman "${podman_flags[@]}" "$@"; }
limits=()  # nofile and nproc for every container: see below

tag=$$
image=localhost/curvscope-smoke:cpu-$tag
server=curvscope-smoke-server-$tag
volume=curvscope-smoke-store-$tag
client_pid=""
remove_containers() {  # this script's containers and volumes, of this run or of a killed one
    local name
    for name in $(pm ps -a --format '{{.Names}}' --filter name=curvscope-smoke- 2>/dev/null); do
        pm rm -f -t 0 "$name" >/dev/null 2>&1 || true
    done
    for name in $(pm volume ls --format '{{.Name}}' --filter name=curvscope-smoke- 2>/dev/null); do
        pm volume rm -f "$name" >/dev/null 2>&1 || true
    done
    for name in $(pm images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null); do
        case $name in localhost/curvscope-smoke:*) pm rmi -f "$name" >/dev/null 2>&1 || true ;; esac
    done
}
prune_cache() {  # the cached layers this build did not use (earlier sources): the cache stays one build
    local keep id removed
    keep=$(sed -nE 's/^--> (Using cache )?([0-9a-f]{11,}).*/\2/p' "$work/build.log" | cut -c1-11)
    [ -n "$keep" ] || return 0
    for _ in $(seq 30); do
        removed=0
        for id in $(pm images -a --format '{{.ID}} {{.Repository}}' | awk '$2 == "<none>" {print substr($1, 1, 11)}'); do
            grep -qx "$id" <<<"$keep" && continue
            pm rmi "$id" >/dev/null 2>&1 && removed=$((removed + 1))  # fails while it has children
        done
        [ $removed -gt 0 ] || break
    done
}
wipe() {  # a directory of this script's podman state, after unmounting whatever lies under it
    local target
    for target in $(awk -v dir="$1/" 'index($5, dir) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
        umount -l "$target" || true
    done
    rm -rf "$1"
}
cleanup() {
    local status=$?
    set +e
    [ -n "$client_pid" ] && kill "$client_pid" 2>/dev/null
    remove_containers
    if [ -n "$cache" ]; then
        [ -s "$work/build.log" ] && grep -q '^Successfully tagged' "$work/build.log" && prune_cache
    else
        wipe "$store"
    fi
    wipe "$work"
    if [ $status -eq 0 ]; then log "passed"; else log "failed (exit $status)"; fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_containers
if [ -n "$cache" ]; then
    # Bounded: a week-old base (security updates) or a store over 12 GB starts afresh.
    if [ -n "$(find "$store" -maxdepth 1 -name base.recipe -mtime +6)" ] \
            || [ "$(du -sk "$store" | cut -f1)" -gt $((12 * 1024 * 1024)) ]; then
        log "cache: starting afresh in $store"
        wipe "$store" && wipe "$run" && mkdir -p "$store"
    fi
fi

# --- 1. the base image --------------------------------------------------------------------------
debian_mirror() {
    # The first Debian archive apt is configured with (one-line and deb822 sources), else the
    # public one.
    local uri
    uri=$( { grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
             grep -hsiE '^URIs:' /etc/apt/sources.list.d/*.sources | sed -E 's/^URIs:[[:space:]]*//I' | tr ' ' '\n'
           } | grep -E '^https?://.*/debian/?$' | head -1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
base_packages=python3,python3-venv,python-is-python3,ca-certificates
if [ -n "${IMAGE_SMOKE_BASE:-}" ]; then
    base=$IMAGE_SMOKE_BASE
    log "base: $base (pulled)"
    pm pull -q "$base" >/dev/null
else
    mirror=${IMAGE_SMOKE_MIRROR:-$(debian_mirror)}
    recipe="bookworm minbase $base_packages $mirror"
    base=localhost/curvscope-smoke-base:bookworm
    stamp=$store/base.recipe
    if [ -n "$cache" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && pm image exists "$base"; then
        log "base: $base (cached, $(date -r "$stamp" +%F))"
    else
        log "base: debootstrap bookworm ($base_packages) from $mirror"
        rootfs=$work/rootfs
        debootstrap --variant=minbase --include="$base_packages" bookworm "$rootfs" "$mirror" \
            >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | pm import -q \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base" >/dev/null
        rm -rf "$rootfs"
        echo "$recipe" >"$stamp"
    fi
fi

# Explicit nofile and nproc limits for every container, build steps included: podman's default
# (1048576) is more than a host without CAP_SYS_RESOURCE allows (a CI runner that is itself a
# container), and podman may run with a lower process limit than this shell (32768 where it could
# not raise its own). 65536 or the hard limit, else the first lower one a container starts with.
hard_limit() {
    local hard
    hard=$(ulimit -H "$1")
    if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then hard=65536; fi
    echo "$hard"
}
nofile=$(hard_limit -n)
for nproc in "$(hard_limit -u)" 32768 16384 8192 4096; do
    if pm run --rm --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" --network none "$base" true \
            2>"$work/limits.log"; then
        limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
        break
    fi
done
[ ${#limits[@]} -gt 0 ] || { cat "$work/limits.log" >&2; die "no container starts with nofile=$nofile and nproc >= 4096"; }
log "limits: ${limits[*]}"
pm run --rm "${limits[@]}" --network none "$base" python -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "the base $base has no Python 3.11 with venv"

# --- the client, outside: a virtual environment with this checkout's thin client -----------------
# Built from a copy, so that the checkout gets no build/ or egg-info (owned by root).
mkdir "$work/client-src"
tar -C client --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$work/client-src" -xf -
python3 -m venv "$work/client" || die "python3 -m venv (Debian: apt-get install python3-venv)"
"$work/client/bin/python" -m pip install --quiet "$work/client-src" grpcio-health-checking \
    || die "installing the client (./client) in a virtual environment"

# --- 2. the CPU image ---------------------------------------------------------------------------
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
[ -n "$torch_version" ] || die "no ARG TORCH_VERSION in the Dockerfile"
build_args=(--build-arg "PYTHON_IMAGE=$base")
# pip, configured as on this machine, fetches the CPU wheel for the image's Python (3.11) and its
# dependencies into a directory that becomes a PEP 503 index mounted into the build.
wheelhouse=$work/wheelhouse
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
        --platform "manylinux_2_28_$(uname -m)")
if python3 -m pip download --quiet --no-deps "${target[@]}" --dest "$wheelhouse/files" \
        "torch==$torch_version+cpu" 2>"$work/pip.log"; then
    python3 -m pip download --quiet "${target[@]}" --dest "$wheelhouse/files" "$wheelhouse"/files/torch-*.whl \
        2>>"$work/pip.log" || { cat "$work/pip.log" >&2; die "pip download of torch's dependencies"; }
    python3 - "$wheelhouse" <<'EOF'
import html, re, sys
from pathlib import Path

root = Path(sys.argv[1])
projects: dict[str, list[str]] = {}
for wheel in sorted((root / "files").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel.name)
for name, files in projects.items():
    (root / "simple" / name).mkdir(parents=True)
    links = "".join(f'<a href="../../files/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
    (root / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
EOF
    log "torch: $(basename "$wheelhouse"/files/torch-*.whl), from pip's configuration, as a local index"
    build_args+=(--build-arg "TORCH_INDEX_URL=file:///wheelhouse/simple" --volume "$wheelhouse:/wheelhouse:ro")
else
    log "torch: no CPU wheel through pip's configuration ($(tail -1 "$work/pip.log")); the Dockerfile's default index"
fi
# The build's pip is configured as this machine's (pip config list: indexes, find-links, CA
# bundle, timeouts, constraints): that configuration as the build's /etc/pip.conf, and the local
# files and directories it names mounted read-only at their own paths, for the build steps only
# (their mount points stay in the image as empty stubs, nothing of their content).
mkdir "$work/pip"
python3 -m pip config list >"$work/pip/list"
python3 - "$work/pip" >"$work/pip/mounts" <<'PY'
import ast, configparser, os, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

out = Path(sys.argv[1])
config = configparser.ConfigParser(interpolation=None)
config["global"] = {}
# Later lines win, as in pip: the files, then the PIP_* environment (":env:", for every command).
lines = (out / "list").read_text().splitlines()
for line in sorted(lines, key=lambda line: line.startswith(":env:")):
    name, _, value = line.partition("=")
    section, _, key = name.rpartition(".")
    section = "global" if section == ":env:" else section
    if not config.has_section(section):
        config.add_section(section)
    config[section][key] = ast.literal_eval(value)
mounts = {}
for section in config.sections():
    for key, value in config[section].items():
        if key not in {"cert", "client-cert", "find-links", "constraint", "index-url", "extra-index-url"}:
            continue
        for token in value.split():
            path = unquote(urlparse(token).path) if token.startswith("file:") else token
            if key.endswith("index-url") and os.path.basename(path.rstrip("/")) == "simple":
                path = os.path.dirname(path.rstrip("/"))  # an index's files lie beside simple/
            if os.path.isabs(path) and os.path.exists(path):
                mounts[path] = os.path.realpath(path)
with open(out / "pip.conf", "w") as conf:
    config.write(conf)
for target, source in sorted(mounts.items()):
    print(f"{source}:{target}:ro")
PY
build_args+=(--volume "$work/pip/pip.conf:/etc/pip.conf:ro")
while read -r mount; do
    build_args+=(--volume "$mount")
done <"$work/pip/mounts"
log "build: $image, pip configured as here ($(grep -c ' = ' "$work/pip/pip.conf") settings, $(wc -l <"$work/pip/mounts") local paths)"
started=$SECONDS
pm build "${limits[@]}" --pull=never --network host --layers --format docker -f Dockerfile -t "$image" "${build_args[@]}" . \
    >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "podman build"; }
grep -E '^torch ' "$work/build.log" | tail -1 | sed 's/^/    build: /' >&2 || true
log "build: done in $((SECONDS - started)) s, $(pm image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
[ "$(pm image inspect -f '{{.Config.User}}' "$image")" = "10001:10001" ] || die "the image does not run as 10001:10001"

# --- 3. run it as a cluster would, check it from outside ----------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port); metrics_port=$(free_port)
grace=300  # an upper bound: the server exits as soon as its calls are done
locked_down=(--read-only --user 10001:10001 --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges
             "${limits[@]}")

# The model and data: the demo's MLP on the digits, written by the image itself.
mkdir "$work/data" && chown 10001:10001 "$work/data"
pm run --rm "${locked_down[@]}" --network none -v "$work/data:/data" --entrypoint python "$image" -c \
    'from pathlib import Path; from curvscope_service.demo import write_demo_files; write_demo_files(Path("/data"), steps=50)' \
    || die "writing the demo model and data in the image"
model=$work/data/digits-mlp.safetensors data=$work/data/digits-512.safetensors

pm volume create "$volume" >/dev/null
pm run -d --name "$server" "${locked_down[@]}" --network host -v "$volume:/var/lib/curvscope" \
    -e CURVSCOPE_HOST=127.0.0.1 -e CURVSCOPE_PORT="$port" -e CURVSCOPE_METRICS_PORT="$metrics_port" \
    -e CURVSCOPE_SHUTDOWN_GRACE="$grace" -e CURVSCOPE_MAX_HVPS=10000 "$image" >/dev/null
log "run: $server on 127.0.0.1:$port (metrics :$metrics_port), read-only, UID 10001, volume $volume"

server_alive() { [ "$(pm inspect -f '{{.State.Running}}' "$server")" = true ]; }
metric() {  # the value of one sample of /metrics, 0 when absent
    python3 - "$metrics_port" "$1" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(next((line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(sys.argv[2] + " ")), "0"))
EOF
}
health() {  # both SERVING: the server overall and the curvscope service
    "$work/client/bin/python" - "$port" 2>"$work/health.log" <<'EOF'
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "curvscope.v1.Curvscope"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
EOF
}
started=$SECONDS
until health; do
    server_alive || { pm logs "$server" >&2; die "the server exited before it served"; }
    [ $((SECONDS - started)) -lt 180 ] || { cat "$work/health.log" >&2; pm logs "$server" >&2; die "not SERVING after 180 s"; }
    sleep 1
done
log "health: SERVING (overall and curvscope.v1.Curvscope) $((SECONDS - started)) s after the start"
[ "$(metric 'curvscope_rpc_seconds_count{code="OK",method="/grpc.health.v1.Health/Check"}')" != 0 ] \
    || die "/metrics does not count the health checks"

"$work/client/bin/curvscope" analyze "$model" --data "$data" --server "127.0.0.1:$port" --eigen 1 --json "$work/report.json" >&2 \
    || { pm logs "$server" >&2; die "the analysis"; }
python3 - "$work/report.json" <<'EOF' || die "the report"
import json, sys
report = json.load(open(sys.argv[1]))
eigen = report["results"]["hessian_eigen"]
assert eigen["converged"] and eigen["largest"][0] > 0, eigen
assert report["data"]["num_samples"] == 512, report["data"]
EOF
mountpoint=$(pm volume inspect -f '{{.Mountpoint}}' "$volume")
[ -n "$(ls -A "$mountpoint/store/blobs/sha256" 2>/dev/null)" ] || die "no blobs in the store volume"
[ "$(stat -c %u "$mountpoint/store")" = 10001 ] || die "the store is not owned by UID 10001"
log "analysis: largest eigenvalue $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"]["hessian_eigen"]["largest"][0])' "$work/report.json"), blobs in the volume"

# --- 4. SIGTERM with a call in flight: the drain ------------------------------------------------
# Seconds of work (1,600 Hessian-vector products; 3 s on an idle core): long enough to be caught
# running, short enough to finish within the grace period on a busy machine.
"$work/client/bin/curvscope" analyze "$model" --data "$data" --server "127.0.0.1:$port" --density --density-steps 200 \
    --density-probes 8 --precision float64 --json "$work/drained.json" >"$work/drained.log" 2>&1 &
client_pid=$!
until [ "$(metric 'curvscope_running{device="cpu"}')" = 1.0 ]; do
    kill -0 "$client_pid" 2>/dev/null || { cat "$work/drained.log" >&2; die "the long analysis ended before it ran"; }
    server_alive || die "the server stopped"
    sleep 0.2
done
pm kill --signal TERM "$server" >/dev/null
stopped=$SECONDS
log "drain: SIGTERM with an analysis running (grace $grace s)"
timeout $((grace + 30)) podman "${podman_flags[@]}" wait "$server" >/dev/null || die "the server did not exit within the grace period"
code=$(pm inspect -f '{{.State.ExitCode}}' "$server")
pm logs "$server" >"$work/server.log" 2>&1
wait "$client_pid" || { cat "$work/drained.log" >&2; die "the analysis in flight at SIGTERM failed"; }
client_pid=""
[ "$code" = 0 ] || { cat "$work/server.log" >&2; die "the server exited with $code after SIGTERM"; }
awk '/shutting down: draining/ { draining = 1 } draining && /Curvscope\/Analyze OK/ { drained = 1 }
     END { exit !drained }' "$work/server.log" \
    || { cat "$work/server.log" >&2; die "the log shows no analysis completing after 'shutting down: draining'"; }
python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["results"]' "$work/drained.json" \
    || die "the drained analysis's report"
log "drain: the analysis completed, exit 0, $((SECONDS - stopped)) s after SIGTERM"
