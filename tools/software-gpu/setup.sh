#!/usr/bin/env bash
# pnpm setup:software-gpu: a software Vulkan GPU (Mesa's lavapipe) for the WebGPU tests and
# `--gpus N --allow-software-gpu`, unpacked into .cache/software-gpu/ of this checkout. Nothing is
# installed on the system: apt-get runs with lists and archives of its own, and the packages are
# unpacked with dpkg -x. Idempotent (FORCE=1 redoes it). Debian only (bookworm's Mesa 22.3 gives
# Dawn no adapter, so Mesa comes from <codename>-backports; 25.0 measured to work).
#
# Writes .cache/software-gpu/software-gpu.json: the ICD file (VK_DRIVER_FILES) and the libraries to
# load by path before Dawn starts (the Vulkan loader and what lavapipe needs newer than the
# system's), which @dtrain/backend reads.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${DTRAIN_SOFTWARE_GPU_DIR:-$ROOT/.cache/software-gpu}
MANIFEST=$DIR/software-gpu.json
fail() { echo "setup:software-gpu: $*" >&2; exit 1; }

if [ -f "$MANIFEST" ] && [ -z "${FORCE:-}" ]; then
  echo "software GPU: ready ($MANIFEST)"
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null || fail "needs Debian's apt-get and dpkg; elsewhere install a Vulkan driver (Mesa >= 24 lavapipe) and point VK_DRIVER_FILES at its ICD file"
# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || fail "cannot tell the Debian release from /etc/os-release"
ARCH=$(dpkg --print-architecture)
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || fail "$KEYRING is missing (Debian's debian-archive-keyring package)"

APT_DIR=$DIR/apt
rm -rf "$DIR/root" "$DIR/debs" && mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/cache" "$DIR/debs" "$DIR/root"
printf 'deb [signed-by=%s] http://deb.debian.org/debian %s main\ndeb [signed-by=%s] http://deb.debian.org/debian %s-backports main\n' \
  "$KEYRING" "$CODENAME" "$KEYRING" "$CODENAME" > "$APT_DIR/sources.list"
APT=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o "Dir::State::Lists=$APT_DIR/lists"
  -o "Dir::Cache=$APT_DIR/cache" -o "Dir::Cache::Archives=$APT_DIR/archives" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
apt-get "${APT[@]}" update
# What the system would need to run the driver (upgrades included), then the driver and loader themselves.
apt-get "${APT[@]}" install -y --download-only --no-install-recommends -t "$CODENAME-backports" mesa-vulkan-drivers libvulkan1
(cd "$DIR/debs" && apt-get "${APT[@]}" download "mesa-vulkan-drivers/$CODENAME-backports" libvulkan1)
for deb in "$APT_DIR"/archives/*.deb "$DIR"/debs/*.deb; do dpkg -x "$deb" "$DIR/root"; done
MESA_VERSION=$(dpkg-deb -f "$(ls "$DIR"/debs/mesa-vulkan-drivers_*.deb | head -1)" Version)
rm -rf "$APT_DIR/archives" "$DIR/debs"

LIB=$DIR/root/usr/lib/$MULTIARCH
LVP=$LIB/libvulkan_lvp.so
[ -f "$LVP" ] || fail "mesa-vulkan-drivers has no $LVP"
[ -f "$LIB/libvulkan.so.1" ] || fail "libvulkan1 has no $LIB/libvulkan.so.1"
MISSING=$(LD_LIBRARY_PATH=$LIB ldd "$LVP" | awk '/not found/ {print $1}' | tr '\n' ' ')
[ -z "$MISSING" ] || fail "lavapipe needs libraries this system lacks: $MISSING(install them with apt-get)"
ICD_IN=$(find "$DIR/root/usr/share/vulkan/icd.d" -name 'lvp_icd*.json' | head -1)
sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$LVP\"#" "$ICD_IN" > "$DIR/lvp_icd.json"
# Libraries of ours that lavapipe resolves (newer than the system's), loaded before it, then the loader.
PRELOAD=$(LD_LIBRARY_PATH=$LIB ldd "$LVP" | awk -v lib="$LIB/" 'index($3, lib) == 1 {printf "\"%s\", ", $3}')
cat > "$MANIFEST.tmp" <<JSON
{
  "icd": "$DIR/lvp_icd.json",
  "preload": [${PRELOAD}"$LIB/libvulkan.so.1"],
  "mesa": "$MESA_VERSION",
  "architecture": "$ARCH"
}
JSON
mv "$MANIFEST.tmp" "$MANIFEST"
echo "software GPU: lavapipe unpacked in $DIR ($(du -sh "$DIR/root" | cut -f1)); $MANIFEST"
