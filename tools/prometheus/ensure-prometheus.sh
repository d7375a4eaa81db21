#!/usr/bin/env bash
# Prints the path of a Prometheus server binary, installing Debian's `prometheus` package first
# when there is none (CI runs as root; elsewhere this needs root or sudo).
# PROMETHEUS_BIN, when set, names the binary to use instead.
set -euo pipefail

find_bin() {
  if [[ -n "${PROMETHEUS_BIN:-}" && -x "${PROMETHEUS_BIN}" ]]; then echo "${PROMETHEUS_BIN}"; return 0; fi
  command -v prometheus 2>/dev/null && return 0
  [[ -x /usr/bin/prometheus ]] && { echo /usr/bin/prometheus; return 0; }
  return 1
}

if bin=$(find_bin); then echo "$bin"; exit 0; fi

if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else
  echo "ensure-prometheus: prometheus is not installed and this is not root; run: apt-get install -y prometheus" >&2
  exit 1
fi
echo "ensure-prometheus: installing Debian's prometheus package" >&2
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: the server binary is all the tests need (no node exporter, no web UI assets).
"${sudo[@]}" apt-get update -qq >&2
# The package's postinst may try to start the service; with no init system that fails harmlessly,
# and the tests start their own server on loopback anyway.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >&2 || true
# Debian's service may have been started by the install: the tests use their own instance and port.
if bin=$(find_bin); then echo "$bin"; exit 0; fi
echo "ensure-prometheus: apt-get install prometheus did not provide a prometheus binary" >&2
exit 1
