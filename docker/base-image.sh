#!/usr/bin/env bash
# A local Python 3.11 base image from Debian packages, for building the project's images where public
# container registries cannot be reached (`make base-image`):
#
#   mmdebstrap bookworm (python3 = 3.11, python3-venv, ca-certificates, passwd, bash) -> rootfs tarball
#   -> `podman import` as $BASE_IMAGE (default localhost/annotator-pipelines-base:bookworm)
#
# What BentoML's generated Dockerfile and docker/Dockerfile.train expect of a base image is there:
# python3 (3.11) and `python3 -m venv`, groupadd/useradd, bash, and `uv` (pinned, from its PyPI wheel,
# so that BentoML's `command -v uv || pip install uv` step does not install an unpinned one).
#
# The host's own extra CA certificates (/usr/local/share/ca-certificates/*.crt: a TLS-inspecting egress
# proxy's, for instance) are copied in, and pip and uv are told to use the system store, so that a build
# step that installs from the Python registry verifies it the way the host does. Public certificates only.
#
# Needs root, mmdebstrap (or debootstrap), podman, and the Debian mirror the host's apt uses.
# Environment: BASE_IMAGE (the tag), SUITE (bookworm), MIRROR (default: the host's apt sources),
# UV_VERSION, PYTHON (a python with pip, to fetch the uv wheel).
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/annotator-pipelines-base:bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-}"
UV_VERSION="${UV_VERSION:-0.9.5}"
PYTHON="${PYTHON:-python3}"
PACKAGES="python3,python3-venv,ca-certificates,passwd,bash"

[ "$(id -u)" = 0 ] || { echo "error: run as root (mmdebstrap and podman import)" >&2; exit 2; }
command -v podman >/dev/null || { echo "error: podman not found (make podman-setup)" >&2; exit 2; }

work="$(mktemp -d /var/tmp/pipelines-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# uv, pinned: its wheel from the Python registry holds one static binary.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/uv" "uv==$UV_VERSION"
"$PYTHON" -m zipfile -e "$work"/uv/uv-*.whl "$work/uv/x"
uv_bin="$(find "$work/uv/x" -path '*.data/scripts/uv' -type f | head -n 1)"
[ -n "$uv_bin" ] || { echo "error: no uv binary in the uv $UV_VERSION wheel" >&2; exit 1; }

mkdir -p "$work/certs"
cp /usr/local/share/ca-certificates/*.crt "$work/certs/" 2>/dev/null || true

tarball="$work/rootfs.tar"
if command -v mmdebstrap >/dev/null; then
  # shellcheck disable=SC2016  # the hooks' "$1" is the root filesystem, expanded by mmdebstrap
  mmdebstrap --variant=minbase --include="$PACKAGES" \
    --customize-hook="install -m 0755 '$uv_bin' \"\$1/usr/local/bin/uv\"" \
    --customize-hook="cp $work/certs/. \"\$1/usr/local/share/ca-certificates/\" -r && chroot \"\$1\" update-ca-certificates >/dev/null" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$SUITE" "$tarball" ${MIRROR:+"$MIRROR"}
elif command -v debootstrap >/dev/null; then
  root="$work/rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "${MIRROR:-http://deb.debian.org/debian}"
  install -m 0755 "$uv_bin" "$root/usr/local/bin/uv"
  cp -r "$work/certs/." "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
  tar -C "$root" -cf "$tarball" .
else
  echo "error: neither mmdebstrap nor debootstrap found (apt-get install mmdebstrap)" >&2; exit 2
fi

certs=/etc/ssl/certs/ca-certificates.crt
podman import \
  --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change "ENV LANG=C.UTF-8" \
  --change "ENV SSL_CERT_FILE=$certs" \
  --change "ENV PIP_CERT=$certs" \
  --change "ENV REQUESTS_CA_BUNDLE=$certs" \
  --change "ENV UV_NATIVE_TLS=1" \
  --change 'CMD ["/bin/bash"]' \
  --message "Debian $SUITE minbase + python3 (3.11), uv $UV_VERSION: annotator-pipelines docker/base-image.sh" \
  "$tarball" "$BASE_IMAGE" >/dev/null

podman run --rm "$BASE_IMAGE" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version; print("python", sys.version.split()[0])'
echo "built $BASE_IMAGE in $((SECONDS - started)) s: $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
