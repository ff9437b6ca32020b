#!/usr/bin/env bash
# Builds the container image from the Dockerfile and runs it, on a machine that cannot pull from a registry nor run
# podman (`make image-test`):
#   1. a Debian base image from Debian's packages (deploy/image_base.sh: mmdebstrap + podman import);
#   2. `buildah bud --isolation chroot` with that base as BASE_IMAGE, timed, the image's size reported;
#   3. the image's own ENTRYPOINT, run with `buildah run --isolation chroot` as its non-root user;
#   4. from outside the container: /health, then the seed's curl request, whose answer must be a Workers AI result.
# chroot isolation shares the host's network, so the server is told to listen on 127.0.0.1 and a free port (the
# same WAI_HOST/WAI_PORT variables a `docker run -e` would set) rather than the image's 0.0.0.0:8787.
# Needs root and mmdebstrap, podman and buildah (apt-get install mmdebstrap podman buildah).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-localhost/workers-ai-local:test}
base=${BASE:-localhost/workers-ai-local-base:bookworm}
log=${IMAGE_TEST_LOG:-$(mktemp -d)/server.log}

for tool in mmdebstrap podman buildah curl python3; do
  command -v "$tool" >/dev/null || { echo "image-test needs $tool (apt-get install mmdebstrap podman buildah)" >&2; exit 1; }
done

bash deploy/image_base.sh "$base"

# --layers: a second build reuses the llama.cpp compile unless its inputs changed. --format docker keeps HEALTHCHECK
# (the OCI image format has no field for it).
start=$(date +%s)
# This host's CA bundle goes to pip for the build only (this network inspects TLS with its own certificate).
buildah bud --isolation chroot --layers --format docker --build-arg BASE_IMAGE="$base" \
  --volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt \
  ${BUILD_ARGS:-} -t "$image" -f Dockerfile .
echo "image-test: built $image in $(( $(date +%s) - start )) s" >&2
podman image inspect "$image" --format '{{.Size}}' |
  awk '{ printf "image-test: image size %.0f MB (%d bytes)\n", $1 / 1e6, $1 }' >&2

config() { buildah inspect --type image --format "$1" "$image"; }
[ "$(config '{{.Docker.Config.User}}')" = app ] || { echo "image-test: the image does not run as its user app" >&2; exit 1; }
config '{{.Docker.Config.Healthcheck.Test}}' | grep -q /health || {
  echo "image-test: the image has no HEALTHCHECK on /health" >&2; exit 1; }
mapfile -t entrypoint < <(config '{{range .Docker.Config.Entrypoint}}{{println .}}{{end}}')
mapfile -t healthcheck < <(config '{{range .Docker.Config.Healthcheck.Test}}{{println .}}{{end}}')

container=$(buildah from "$image")
server=""
cleanup() {
  if [ -n "$server" ]; then kill -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  buildah rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Which ggml CPU variant this machine gets: each library's own score (0: this CPU lacks its instruction sets);
# ggml loads the highest.
buildah run --isolation chroot "$container" -- python - <<'PY'
import ctypes, pathlib
import llama_cpp
lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
scores = {p.name: ctypes.CDLL(str(p)).ggml_backend_score() for p in sorted(lib.glob("libggml-cpu-*.so"))}
for name, score in scores.items():
    print(f"image-test: {name} scores {score}")
print("image-test: this CPU gets", max(scores, key=scores.get))
PY

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# --log-level debug: ggml says there which CPU library it loaded.
setsid buildah run --isolation chroot --env WAI_HOST=127.0.0.1 --env WAI_PORT="$port" --env WAI_LOG_LEVEL=debug \
  "$container" -- "${entrypoint[@]}" >"$log" 2>&1 &
server=$!
url=http://127.0.0.1:$port
for _ in $(seq 600); do
  if curl -fsS "$url/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "image-test: the server exited; its log:" >&2; cat "$log" >&2; exit 1; fi
  sleep 0.5
done
curl -fsS "$url/health" | python3 -c 'import json, sys; h = json.load(sys.stdin); print("image-test: /health", h)'
grep -o 'loaded CPU backend from [^ ]*' "$log" | sed 's/^/image-test: /' >&2 || {
  echo "image-test: ggml did not say which CPU backend it loaded" >&2; exit 1; }

# The image's HEALTHCHECK command, run inside the container as Docker would run it.
[ "${healthcheck[0]}" = CMD ] || { echo "image-test: HEALTHCHECK is not an exec-form CMD" >&2; exit 1; }
buildah run --isolation chroot --env WAI_PORT="$port" "$container" -- "${healthcheck[@]:1}"
echo "image-test: HEALTHCHECK passes" >&2

# The seed's curl (/work/shared/seed), pointed here: the account path and the form-encoded JSON body as written.
curl -fsS "$url/client/v4/accounts/local/ai/run/@cf/meta/llama-3.1-8b-instruct-fast" \
  -X POST \
  -H "Authorization: Bearer local" \
  -d '{ "messages": [{ "role": "system", "content": "You are a friendly assistant" }, { "role": "user", "content": "Why is pizza so good" }]}' |
  python3 -c '
import json, sys
body = json.load(sys.stdin)
assert body["success"] is True and body["errors"] == [], body
answer = body["result"]["response"]
assert isinstance(answer, str) and answer.strip(), body
assert body["result"]["usage"]["completion_tokens"] > 0, body
print("image-test: the seed request answered:", answer[:120].replace("\n", " "), "...")
'
echo "image-test: passed" >&2
