#!/usr/bin/env bash
# System packages the tests need: a Vulkan loader and Mesa's lavapipe, a Vulkan driver that runs
# on the CPU, so that the wgpu backend has a real device on machines without a GPU; curl and
# openssl, the serve tests' HTTPS client and the certificate they make; Prometheus, the server
# that scrapes `keel serve` in those tests (Debian's package; its service is not started);
# haproxy, the load balancer in front of a fleet's replicas (scripts/fleet.sh; docs/FLEET.md;
# its service is not started either: fleet.sh runs it as a background process).
# Installed with apt-get (as root, or with sudo) only when missing.
set -euo pipefail
missing=()
ldconfig -p | grep -q 'libvulkan\.so\.1' || missing+=(libvulkan1)
[[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json || -e /usr/share/vulkan/icd.d/lvp_icd.aarch64.json ]] ||
    missing+=(mesa-vulkan-drivers)
command -v curl > /dev/null || missing+=(curl)
command -v openssl > /dev/null || missing+=(openssl)
command -v prometheus > /dev/null || missing+=(prometheus)
command -v haproxy > /dev/null || missing+=(haproxy)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (the tests' system packages)"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    (DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}") > /dev/null
fi
