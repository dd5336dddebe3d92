# shellcheck shell=bash
# Shared helpers of scripts/setup, scripts/test and scripts/bench. Source it; it defines
# functions only and changes nothing by itself.
#
#   ensure_packages [EXTRA...]  installs the Debian packages Arca needs (and EXTRA) that
#                               are missing: one `apt-get update`, then one non-interactive
#                               `apt-get install`. Does nothing when all are present.
#   ensure_cargo                puts ~/.cargo/bin on PATH if needed and checks that cargo,
#                               rustfmt and clippy are there (they cannot be downloaded here).
#   start_throwaway_postgres DIR
#                               a private PostgreSQL cluster in DIR (made here; it must not
#                               exist): trust auth, TCP on 127.0.0.1 only and over TLS only
#                               (a test CA made in DIR/tls signs the server certificate for
#                               127.0.0.1 and localhost; plaintext TCP is refused), a free
#                               port, the unix socket in DIR; run as the `postgres` user when
#                               root (PostgreSQL refuses root). Creates the database `arca` and
#                               exports ARCA_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/arca
#                               ?sslmode=verify-full&sslrootcert=DIR/tls/ca.pem, and
#                               ARCA_TEST_POSTGRES_OTHER_CA (a CA that did not sign it).
#   stop_throwaway_postgres     stops that cluster (fast shutdown) and removes its DIR.

# softhsm2: the dev/test HSM; opensc: pkcs11-tool (reads HSM attributes back in tests);
# p11-kit + p11-kit-modules: `p11-kit server` and p11-kit-client.so (HSM outage tests);
# protobuf-compiler + libprotobuf-dev: protoc and the well-known types for build.rs;
# postgresql: the second store back end (a throwaway cluster in scripts/test), and through
# postgresql-client the psql, pg_dump and pg_restore of the tests (the backup drill,
# tests/it/backup.rs); pkg-config, build-essential: native
# builds (bundled SQLite); ca-certificates: TLS to the package registries; openssl: test
# certificates (the throwaway PostgreSQL's TLS, scripts/make-test-ca); age: tests that
# decrypt custodian shares encrypted with `operator init --age-recipient`; sqlite3: tests
# that tamper with a copy of the database by hand (as an attacker with file access would),
# and the backup drill's `.backup`;
# python3: scripts/check-layering (parses the Rust sources' imports).
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
    openssl
    age
    sqlite3
    python3
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

# The bin directory of the newest PostgreSQL server installed (Debian keeps each major
# version under /usr/lib/postgresql/N/bin and puts only client wrappers on PATH).
_arca_pg_bindir() {
    local d best=""
    # Glob order is the newest last while major versions have two digits (10 and later).
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            best="$d"
        fi
    done
    if [ -z "$best" ] && command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        best="$(dirname "$(command -v initdb)")"
    fi
    if [ -z "$best" ]; then
        echo "error: no PostgreSQL server found (initdb, pg_ctl); install the postgresql package" >&2
        return 1
    fi
    echo "$best"
}

# A TCP port on 127.0.0.1 that nothing listens on now (pg_ctl start retries with another
# port if it is taken in between).
_arca_free_port() {
    local port i
    for i in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "error: no free TCP port found on 127.0.0.1" >&2
    return 1
}

_ARCA_PG_DIR=""
_ARCA_PG_BIN=""
_ARCA_PG_RUNAS=()

start_throwaway_postgres() {
    local dir="${1:?usage: start_throwaway_postgres DIR}" bin port attempt started=""
    bin="$(_arca_pg_bindir)" || return 1
    if [ -e "$dir" ]; then
        echo "error: $dir exists; start_throwaway_postgres makes its own directory" >&2
        return 1
    fi
    mkdir -m 0700 "$dir" || return 1
    dir="$(cd "$dir" && pwd -P)" || return 1
    _ARCA_PG_DIR="$dir"
    _ARCA_PG_BIN="$bin"
    _ARCA_PG_RUNAS=()
    if [ "$(id -u)" -eq 0 ]; then
        # PostgreSQL refuses to run as root: initdb and the server run as `postgres`.
        if ! id postgres >/dev/null 2>&1; then
            echo "error: running as root, and there is no postgres user to run PostgreSQL as" >&2
            return 1
        fi
        chown postgres: "$dir" || return 1
        _ARCA_PG_RUNAS=(runuser -u postgres --)
        if ! runuser -u postgres -- test -w "$dir"; then
            echo "error: the postgres user cannot reach $dir: a parent directory is not" \
                "traversable (mktemp -d makes 0700 directories); chmod o+x it, or use another TMPDIR" >&2
            return 1
        fi
    fi
    # An ICU en-US default collation, as most production clusters have a linguistic one,
    # so the tests catch SQL that silently depends on byte order; the C locale if this
    # PostgreSQL has no ICU.
    if ! "${_ARCA_PG_RUNAS[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
        --locale=C --locale-provider=icu --icu-locale=en-US </dev/null >"$dir/initdb.log" 2>&1; then
        rm -rf "$dir/data"
        if ! "${_ARCA_PG_RUNAS[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
            --no-locale </dev/null >"$dir/initdb.log" 2>&1; then
            echo "error: initdb failed:" >&2
            cat "$dir/initdb.log" >&2
            return 1
        fi
    fi
    cp "$dir/data/postgresql.conf" "$dir/postgresql.conf.orig"
    _arca_pg_tls "$dir" || return 1
    # TCP only over TLS: a plaintext connection finds no pg_hba entry and is refused.
    {
        echo "local all all trust"
        echo "hostssl all all 127.0.0.1/32 trust"
    } >"$dir/pg_hba.conf.new"
    "${_ARCA_PG_RUNAS[@]}" cp "$dir/pg_hba.conf.new" "$dir/data/pg_hba.conf" || return 1
    for attempt in 1 2 3 4 5; do
        port="$(_arca_free_port)" || return 1
        # Settings in the config file, not through pg_ctl -o (no quoting). fsync off: a
        # throwaway cluster trades crash safety for speed.
        {
            cat "$dir/postgresql.conf.orig"
            echo "# scripts/lib.sh start_throwaway_postgres"
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $port"
            echo "unix_socket_directories = '$dir'"
            echo "max_connections = 200"
            echo "fsync = off"
            echo "synchronous_commit = off"
            echo "full_page_writes = off"
            echo "ssl = on"
            echo "ssl_cert_file = '$dir/tls/server.pem'"
            echo "ssl_key_file = '$dir/tls/server.key'"
            echo "ssl_min_protocol_version = 'TLSv1.2'"
        } >"$dir/postgresql.conf.new"
        "${_ARCA_PG_RUNAS[@]}" cp "$dir/postgresql.conf.new" "$dir/data/postgresql.conf" || return 1
        if "${_ARCA_PG_RUNAS[@]}" "$bin/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            </dev/null >"$dir/pg_ctl.log" 2>&1; then
            started=1
            break
        fi
        # Retry only when the port was taken in the meantime.
        grep -q 'could not bind\|Address already in use' "$dir/server.log" 2>/dev/null || break
    done
    if [ -z "$started" ]; then
        echo "error: PostgreSQL did not start; pg_ctl and server log:" >&2
        cat "$dir/pg_ctl.log" >&2
        tail -n 30 "$dir/server.log" >&2 2>/dev/null
        return 1
    fi
    "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c 'CREATE DATABASE arca' </dev/null || return 1
    export ARCA_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/arca?sslmode=verify-full&sslrootcert=$dir/tls/ca.pem"
    export ARCA_TEST_POSTGRES_OTHER_CA="$dir/tls/other-ca.pem"
    echo "throwaway PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (TLS only), data in $dir"
}

# The throwaway cluster's TLS material in DIR/tls: a test CA (ECDSA P-256), the server's
# certificate for 127.0.0.1 and localhost signed by it, and another CA that signed
# nothing the server presents. Readable by the user the server runs as.
_arca_pg_tls() {
    local dir="$1" tls="$1/tls"
    mkdir -m 0700 "$tls" || return 1
    (
        set -e
        cd "$tls"
        umask 077
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
            -subj "/CN=arca throwaway PostgreSQL CA" -keyout ca.key -out ca.pem
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
            -subj "/CN=another CA" -keyout other-ca.key -out other-ca.pem
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj "/CN=127.0.0.1" -keyout server.key -out server.csr
        printf '%s\n' "subjectAltName = IP:127.0.0.1, DNS:localhost" \
            "extendedKeyUsage = serverAuth" "basicConstraints = CA:FALSE" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
            -extfile server.ext -out server.pem
        rm -f server.csr server.ext ca.srl ca.key other-ca.key
        chmod 0644 ca.pem other-ca.pem server.pem
    ) >"$dir/tls.log" 2>&1 || {
        echo "error: could not make the throwaway PostgreSQL's TLS certificates:" >&2
        cat "$dir/tls.log" >&2
        return 1
    }
    if [ "${#_ARCA_PG_RUNAS[@]}" -gt 0 ]; then
        chown -R postgres: "$tls" || return 1
    fi
}

stop_throwaway_postgres() {
    local dir="${1:-$_ARCA_PG_DIR}"
    [ -n "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ]; then
        "${_ARCA_PG_RUNAS[@]}" "${_ARCA_PG_BIN:-$(_arca_pg_bindir)}/pg_ctl" stop -D "$dir/data" \
            -m fast -w -t 60 </dev/null >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    if [ "$dir" = "$_ARCA_PG_DIR" ]; then
        _ARCA_PG_DIR=""
        unset ARCA_TEST_POSTGRES_URL
    fi
}
