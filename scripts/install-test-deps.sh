#!/usr/bin/env bash
# Install the Debian packages the test suite needs from the system, when their binaries are missing.
#
# Run by the README's test command (so by CI too) before the virtualenv is made; safe to run again: it
# installs nothing when every binary is there. Installing needs root; without it the script names the
# missing packages and the command that installs them, and exits 1.
set -euo pipefail

# What the tests run -> the Debian package that provides it. A binary is an absolute path, or a command
# name looked up on PATH and in /usr/sbin and /sbin. To need another package, add one line here, e.g.
#   /usr/bin/gdb gdb
NEEDED=(
  "/usr/sbin/sshd openssh-server" # the SSH tests drive a real OpenSSH sshd on loopback
  "/usr/bin/chromium chromium" # the Prefect UI tests drive headless Chromium (never a downloaded browser)
  "/usr/bin/chromedriver chromium-driver" # ... through chromedriver (Selenium)
  # The NERSC tests submit to a real Slurm on loopback (stemstream_testing/slurm_cluster.py): the
  # controller, one node daemon per simulated node, the client commands, and munge for authentication.
  "/usr/sbin/slurmctld slurm-wlm"
  "/usr/sbin/slurmd slurm-wlm"
  "/usr/bin/sbatch slurm-wlm" # slurm-client, a dependency of slurm-wlm: sbatch squeue scontrol scancel sinfo
  "/usr/sbin/munged munge"
  # The catalogue tests run a real PostgreSQL server on loopback (stemstream_testing/postgres.py).
  "/usr/bin/pg_ctlcluster postgresql" # postgresql-common; the server binaries are under /usr/lib/postgresql/*/bin
  # The metrics test scrapes a running session with a real Prometheus server on loopback.
  "/usr/bin/prometheus prometheus"
  # The facility guide's systemd units are checked with systemd-analyze verify (tests/facility/test_guide.py).
  "/usr/bin/systemd-analyze systemd"
)

have() {
  case "$1" in
    /*) [ -x "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] ;;
  esac
}

missing=()
for entry in "${NEEDED[@]}"; do
  read -r binary package <<<"$entry"
  if ! have "$binary" && [[ " ${missing[*]-} " != *" $package "* ]]; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" = 0 ]; then
  echo "install-test-deps: nothing missing"
  exit 0
fi

install_cmd="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: missing Debian package(s): ${missing[*]}; installing needs root:" >&2
  echo "  sudo sh -c '$install_cmd'" >&2
  exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Wait for a dpkg lock held by another apt run instead of failing at once.
apt=(apt-get -o DPkg::Lock::Timeout=300)
if ! { "${apt[@]}" update -qq &&
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"; } \
  >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-test-deps: could not install ${missing[*]} (output above)" >&2
  exit 1
fi

for entry in "${NEEDED[@]}"; do
  read -r binary package <<<"$entry"
  if ! have "$binary"; then
    echo "install-test-deps: installed ${package}, but ${binary} is still missing" >&2
    exit 1
  fi
done
echo "install-test-deps: installed ${missing[*]}"
