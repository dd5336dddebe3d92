# shellcheck shell=bash
# Shared helpers of scripts/setup, scripts/test and scripts/bench. Source it; it defines
# functions only and changes nothing by itself.
#
#   ensure_packages [EXTRA...]  installs the Debian packages Arca needs (and EXTRA) that
#                               are missing: one `apt-get update`, then one non-interactive
#                               `apt-get install`. Does nothing when all are present.
#   ensure_cargo                puts ~/.cargo/bin on PATH if needed and checks that cargo,
#                               rustfmt and clippy are there (they cannot be downloaded here).

# softhsm2: the dev/test HSM; opensc: pkcs11-tool (reads HSM attributes back in tests);
# p11-kit + p11-kit-modules: `p11-kit server` and p11-kit-client.so (HSM outage tests);
# protobuf-compiler + libprotobuf-dev: protoc and the well-known types for build.rs;
# postgresql: the second store back end (for later); pkg-config, build-essential: native
# builds (bundled SQLite); ca-certificates: TLS to the package registries.
ARCA_PACKAGES=(
    softhsm2
    opensc
    p11-kit
    p11-kit-modules
    protobuf-compiler
    libprotobuf-dev
    postgresql
    pkg-config
    build-essential
    ca-certificates
)

_arca_pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

ensure_packages() {
    local missing=() p
    for p in "${ARCA_PACKAGES[@]}" "$@"; do
        _arca_pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "error: need root (or sudo) to install: ${missing[*]}" >&2; return 1; }
        sudo=(sudo)
    fi
    echo "== installing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -qq </dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null
}

ensure_cargo() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null; then
        echo "error: cargo not found; install a Rust toolchain (rust-version in Cargo.toml) first" >&2
        return 1
    fi
}
