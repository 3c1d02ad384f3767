#!/usr/bin/env bash
# The system packages the agent's container driver needs: runc (runs each app), slirp4netns
# (its outbound network), tini (PID 1 in the container; tini-static inside images), iproute2
# (`ip netns`), skopeo and umoci (pulling and unpacking container images); and for the tests
# of images, the reference registry (docker-registry) and busybox-static (test images' root);
# for the dashboard's browser tests, Chromium and its WebDriver (chromium, chromium-driver).
# Run by `make run` and `make test` every time, so it is quiet and quick when all are present.
# As root with apt-get, it installs what is missing; otherwise it says in one sentence what to
# install and succeeds anyway: the process driver still runs apps (unisolated) on a
# development machine, and the agent says so loudly.
set -euo pipefail

# command:package
needed=(runc:runc slirp4netns:slirp4netns tini:tini ip:iproute2 skopeo:skopeo umoci:umoci
    docker-registry:docker-registry busybox:busybox-static
    chromium:chromium chromedriver:chromium-driver)

have() {
    # /usr/sbin and /sbin are not on a regular user's PATH on Debian; runc and ip live there.
    command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/sbin/$1" ]]
}

missing=()
for pair in "${needed[@]}"; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

# "a", "a and b", "a, b and c"
listed=${missing[0]}
for ((i = 1; i < ${#missing[@]}; i++)); do
    if ((i == ${#missing[@]} - 1)); then listed+=" and ${missing[i]}"; else listed+=", ${missing[i]}"; fi
done

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "hangar: installing ${listed} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        exit 0
    fi
    echo "hangar: apt-get could not install ${listed}; until they are installed, apps run unisolated under the process driver" >&2
    exit 0
fi

echo "hangar: the container driver needs ${listed}: install them (Debian: sudo apt-get install ${missing[*]}); until then apps run unisolated under the process driver" >&2
exit 0
