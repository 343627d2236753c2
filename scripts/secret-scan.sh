#!/usr/bin/env bash
# The secret scan CI runs: fails when a file holds something detect-secrets takes for a
# secret that .secrets.baseline does not list, or lists as a real one.
#
#   bash scripts/secret-scan.sh [DIR]
#
# DIR (default: the repository) is scanned whole: in a git checkout, the tracked files
# and the untracked ones git does not ignore; elsewhere every file outside target/ and
# .git/. Known secrets are matched by file, type and hash, not by line, so editing
# around a test fixture does not fail the scan. After adding a fixture with a fake key,
# refresh the baseline and mark the new entries as not secret:
#
#   detect-secrets scan --baseline .secrets.baseline && detect-secrets audit .secrets.baseline
set -euo pipefail

dir="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$dir"
if [ ! -f .secrets.baseline ]; then
    echo "secret-scan.sh: no .secrets.baseline in $dir" >&2
    exit 1
fi
if [ "$(git rev-parse --show-toplevel 2>/dev/null || true)" = "$PWD" ]; then
    mapfile -t files < <(git ls-files --cached --others --exclude-standard)
else
    mapfile -t files < <(find . -type f -not -path './target/*' -not -path './.git/*' | sed 's#^\./##')
fi
scan=()
for f in "${files[@]}"; do
    # Files git still tracks but the work tree no longer has are skipped, as is the
    # baseline itself (it holds hashes, not secrets).
    if [ -f "$f" ] && [ "$f" != .secrets.baseline ]; then
        scan+=("$f")
    fi
done

found="$(mktemp)"
trap 'rm -f "$found"' EXIT
detect-secrets scan "${scan[@]}" >"$found"

python3 - .secrets.baseline "$found" <<'PY'
import json
import sys

baseline = json.load(open(sys.argv[1]))
found = json.load(open(sys.argv[2]))
known = {
    (name, s["type"], s["hashed_secret"])
    for name, secrets in baseline["results"].items()
    for s in secrets
    if s.get("is_secret") is not True
}
new = [
    (name, s["line_number"], s["type"])
    for name, secrets in sorted(found["results"].items())
    for s in secrets
    if (name, s["type"], s["hashed_secret"]) not in known
]
for name, line, kind in new:
    print(f"secret-scan: {name}:{line}: {kind}, not in .secrets.baseline", file=sys.stderr)
if new:
    print(
        f"secret-scan: {len(new)} possible secret(s). Remove them, or if they are test "
        "fixtures, add them to the baseline (see the top of scripts/secret-scan.sh).",
        file=sys.stderr,
    )
    sys.exit(1)
count = sum(len(s) for s in found["results"].values())
print(f"secret-scan: {len(found['results'])} files with {count} known test secrets, nothing new")
PY
