#!/usr/bin/env bash
# Print the path of a working CPython X.Y interpreter, or fail naming the version.
#
#   scripts/find-python.sh 3.12
#
# Takes $PYTHON3_12 when set (for 3.12; likewise PYTHON3_10 ...), else looks at python3.12 on PATH,
# pyenv's installs of 3.12.*, /usr/bin and /usr/local/bin. Each candidate is run: a pyenv shim
# exists for every installed version but fails unless that version is selected.
set -euo pipefail

want="${1:?usage: find-python.sh X.Y}"
[[ "$want" =~ ^3\.[0-9]+$ ]] || { echo "find-python.sh: '$want' is not a Python version like 3.12" >&2; exit 2; }

works() {
    [[ -n "$1" ]] && "$1" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" \
        >/dev/null 2>&1
}

override_var="PYTHON${want/./_}"
if [[ -n "${!override_var:-}" ]]; then
    works "${!override_var}" || { echo "find-python.sh: $override_var=${!override_var} is not a working Python $want" >&2; exit 1; }
    "${!override_var}" -c 'import sys; print(sys.executable)'
    exit 0
fi
candidates=("$(command -v "python$want" || true)")
pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
# Newest patch release first.
while read -r dir; do
    candidates+=("$dir/bin/python$want")
done < <(ls -d "$pyenv_root/versions/$want".* 2>/dev/null | sort -t. -k3 -n -r)
candidates+=("/usr/bin/python$want" "/usr/local/bin/python$want")

for candidate in "${candidates[@]}"; do
    if works "$candidate"; then
        "$candidate" -c 'import sys; print(sys.executable)'
        exit 0
    fi
done
echo "find-python.sh: Python $want not found (looked for python$want on PATH, in pyenv ($pyenv_root/versions/$want.*), /usr/bin, /usr/local/bin); install it (e.g. \`pyenv install $want\`) or set $override_var=/path/to/python$want" >&2
exit 1
