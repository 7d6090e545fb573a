#!/usr/bin/env bash
# Prepare a machine to run the test suite.  Idempotent; quick when everything is in place.
#
#  * Debian packages: postgresql-15, postgresql-client-15, redis-server (required; the tests of
#    the Redis-shared limits start their own redis-server) and prometheus (required for its
#    promtool, which checks config/prometheus/alerts.yml: about 20 MB, 10 s to install; its
#    service is not started), nftables and iproute2 (as root: the dead-link tests' black holes,
#    the store-link tests' network namespaces), libpostgresql-jdbc-java and (without javac)
#    default-jdk-headless for the JDBC tests, pgbouncer (optional, benchmarks only), python3-venv (only if
#    `python3 -m venv` cannot work).  Only missing
#    packages are installed -- never `apt-get install` something already installed, since that
#    can upgrade it.  Service auto-start is blocked with policy-rc.d while installing (no
#    systemd in CI); the test suite runs its own throwaway clusters.
#  * .venv (python3 -m venv) with `pip install -e '.[test]'`, redone when pyproject.toml changes.
#
# As non-root with packages missing: prints the apt-get command to run and exits 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[setup-test-env] %s\n' "$*" >&2; }

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# ------------------------------------------------------------------ Debian packages
# prometheus: promtool checks the alert rules (tests/unit/test_monitoring_files.py; fails without it under CI).
required=(postgresql-15 postgresql-client-15 redis-server prometheus)
# scripts/run-tests.sh also tests the mypyc-compiled build unless POS_PROXY_TEST_COMPILED=0: a C
# compiler and Python headers (python3-dev for Debian's python3; a pyenv build has its own).
if [ "${POS_PROXY_TEST_COMPILED:-1}" != 0 ]; then
    required+=(gcc python3-dev)
fi
# nftables: the dead-link tests black-hole one loopback connection with nft rules
# (tests/integration/test_dead_links.py; this kernel has no netem). Rules need root, so only root
# needs the package: elsewhere those tests skip; under CI (root) a missing nft fails them.
# iproute2: the store-link tests put the proxy in a network namespace of their own
# (tests/integration/test_store_links.py); likewise root only.
if [ "$(id -u)" -eq 0 ]; then
    required+=(nftables iproute2)
fi
# libpostgresql-jdbc-java (pgjdbc, /usr/share/java/postgresql.jar, about 1 MB): tests/integration/
# test_jdbc.py and the fuzzer's JDBC recording compile a Java program against it at test time
# (under CI a missing driver or JDK fails them; elsewhere they skip). default-jdk-headless only when
# there is no javac: any JDK 11 or later will do, so one already there is left alone.
required+=(libpostgresql-jdbc-java)
if ! command -v javac >/dev/null 2>&1; then
    required+=(default-jdk-headless)
fi
# pgbouncer: the benchmark; systemd: systemd-analyze checks of the unit file (no systemd runs).
optional=(pgbouncer systemd)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    required+=(python3-venv)
fi

have_dpkg=1
command -v dpkg-query >/dev/null 2>&1 || have_dpkg=0

missing_required=()
missing_optional=()
if [ "$have_dpkg" = 1 ]; then
    for pkg in "${required[@]}"; do is_installed "$pkg" || missing_required+=("$pkg"); done
    for pkg in "${optional[@]}"; do is_installed "$pkg" || missing_optional+=("$pkg"); done
else
    log "not a Debian system (no dpkg-query): skipping system packages; set POS_PROXY_PG_BINDIR if needed"
fi

if [ "${#missing_required[@]}" -gt 0 ] || [ "${#missing_optional[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        if [ "${#missing_required[@]}" -gt 0 ]; then
            log "missing Debian packages: ${missing_required[*]}"
            log "install them with:  sudo apt-get update && sudo apt-get install -y ${missing_required[*]}"
            [ "${#missing_optional[@]}" -eq 0 ] || log "optional (benchmarks): sudo apt-get install -y ${missing_optional[*]}"
            exit 1
        fi
        log "optional package(s) not installed (needed only for benchmarks): ${missing_optional[*]}"
    else
        export DEBIAN_FRONTEND=noninteractive
        apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

        # Keep maintainer scripts from starting services (no systemd/init in CI containers).
        created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 0755 /usr/sbin/policy-rc.d
            created_policy=1
        fi
        cleanup_policy() {
            if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
        }
        trap cleanup_policy EXIT

        if [ -z "${POS_PROXY_APT_UPDATED:-}" ]; then
            log "apt-get update"
            apt-get update -q
            export POS_PROXY_APT_UPDATED=1
        fi
        if [ "${#missing_required[@]}" -gt 0 ]; then
            log "installing: ${missing_required[*]}"
            apt-get install "${apt_opts[@]}" "${missing_required[@]}"
        fi
        if [ "${#missing_optional[@]}" -gt 0 ]; then
            log "installing optional: ${missing_optional[*]}"
            apt-get install "${apt_opts[@]}" "${missing_optional[@]}" ||
                log "WARNING: could not install ${missing_optional[*]} (only needed for benchmarks)"
        fi

        cleanup_policy
        trap - EXIT
    fi
fi

# ------------------------------------------------------------------ virtualenv
venv=.venv
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    log "$venv exists but is not a working Python >= 3.11 venv: remove it (make clean) and rerun"
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "python3 is $(python3 -V 2>&1); Python >= 3.11 is required"
        exit 1
    fi
    log "creating $venv with $(python3 -V 2>&1)"
    python3 -m venv "$venv"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
stamp="$venv/.pos-db-proxy-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    log "pip install -e '.[test]'"
    pip_log="$(mktemp)"
    if ! "$venv/bin/python" -m pip install -q -e '.[test]' >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        rm -f "$pip_log"
        log "pip install failed"
        exit 1
    fi
    rm -f "$pip_log"
    printf '%s\n' "$want" >"$stamp"
else
    log "$venv is up to date with pyproject.toml"
fi
