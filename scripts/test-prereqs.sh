#!/usr/bin/env bash
# What the test suite needs from the operating system, installed BEFORE the tests run
# (the suite itself installs nothing): Debian's chromium for the browser tests and
# SLURM + munge for the HPC tests (started by the tests with deploy/slurm-local.sh).
#
#   bash scripts/test-prereqs.sh
#
# As root on Debian/Ubuntu: installs what is missing with apt-get and fails loudly if it
# cannot. As another user: says which tests will be skipped, and succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[test-prereqs] %s\n' "$*" >&2; }

need_chromium=0; [[ -x /usr/bin/chromium ]] || need_chromium=1
need_slurm=0
for c in slurmctld slurmd sbatch munged; do
  command -v "$c" >/dev/null 2>&1 || [[ -x "/usr/sbin/$c" ]] || need_slurm=1
done
if [[ $need_chromium -eq 0 && $need_slurm -eq 0 ]]; then
  say "chromium and SLURM are installed"; exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
  [[ $need_chromium -eq 1 ]] && say "chromium is missing and installing it needs root: the browser tests will be skipped"
  [[ $need_slurm -eq 1 ]] && say "SLURM is missing and installing it needs root: the SLURM tests will be skipped"
  exit 0
fi
command -v apt-get >/dev/null || { say "error: no apt-get here; install chromium, slurmctld, slurmd, slurm-client and munge by hand"; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if [[ $need_chromium -eq 1 ]]; then
  say "installing Debian's chromium"
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
  [[ -x /usr/bin/chromium ]] || { say "error: apt-get installed chromium but /usr/bin/chromium is missing"; exit 1; }
fi
if [[ $need_slurm -eq 1 ]]; then
  bash deploy/slurm-local.sh install
fi
say "done"
