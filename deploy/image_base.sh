#!/usr/bin/env bash
# Makes a Debian base image locally from Debian's own packages, for machines that cannot pull one from a registry:
#   deploy/image_base.sh [IMAGE] [SUITE]      (defaults: localhost/workers-ai-local-base:bookworm, bookworm)
# mmdebstrap's minbase is what debian:SUITE-slim is made from (essential packages and apt); podman import turns the
# tarball into an image buildah can build FROM. Kept until removed: a second run with the image present does nothing.
set -euo pipefail
image=${1:-localhost/workers-ai-local-base:bookworm}
suite=${2:-bookworm}
if podman image exists "$image"; then
  echo "base image $image already present" >&2
  exit 0
fi
tarball=$(mktemp --suffix=.tar)
trap 'rm -f "$tarball"' EXIT
# Security updates as in the official image; the mirror is the one Debian's own images name.
mmdebstrap --quiet --variant=minbase --include=ca-certificates \
  --setup-hook='mkdir -p "$1/etc/apt/sources.list.d"' \
  "$suite" "$tarball" \
  "deb http://deb.debian.org/debian $suite main" \
  "deb http://deb.debian.org/debian $suite-updates main" \
  "deb http://deb.debian.org/debian-security $suite-security main"
podman import --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
echo "base image $image made from Debian $suite" >&2
