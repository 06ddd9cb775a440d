#!/usr/bin/env bash
# Create benchmarks/.peers-venv with the peer annotators (scanpy ingest, CellTypist)
# pinned in requirements-peers.txt, isolated from dask-annot's own environment.
# Prints the venv's python path on the last line of stdout.
# Usage: bash benchmarks/setup_peers.sh [PYTHON]   (default: python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.peers-venv"
py="${1:-python3}"
req="$here/requirements-peers.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "peers venv up to date: $venv" >&2
else
    rm -rf "$venv"
    "$py" -m venv "$venv"
    # (grep drops pip's notes about this machine's absent local index mirrors)
    if ! "$venv/bin/python" -m pip install --quiet -r "$req" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; then
        echo "pip install -r $req into $venv failed" >&2
        exit 1
    fi
    # fail here, not mid-benchmark, if an import is broken
    "$venv/bin/python" -W ignore -c "import scanpy, celltypist, sklearn, pynndescent, leidenalg" >&2
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
