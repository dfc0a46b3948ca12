#!/usr/bin/env bash
# Refreshes the vendored RustSec advisory snapshot (deploy/supply-chain/advisory-db) from a
# checkout of https://github.com/rustsec/advisory-db: the advisories of every crate Cargo.lock
# names, the list of crates covered (COVERED) and where and when the snapshot was taken
# (SNAPSHOT). Run it where GitHub is reachable, after adding a dependency or every few months:
#
#   git clone https://github.com/rustsec/advisory-db /tmp/advisory-db
#   bash deploy/supply-chain/refresh-advisories.sh /tmp/advisory-db
set -euo pipefail
checkout=${1:?usage: refresh-advisories.sh <advisory-db checkout>}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
snapshot="$here/advisory-db"
[[ -d "$checkout/crates" ]] || { echo "$checkout has no crates/ directory" >&2; exit 1; }

rm -rf "$snapshot"
mkdir -p "$snapshot/crates"
grep '^name = ' "$repo/Cargo.lock" | sed 's/name = "\(.*\)"/\1/' | sort -u >"$snapshot/COVERED"
while read -r crate; do
  if [[ -d "$checkout/crates/$crate" ]]; then
    cp -r "$checkout/crates/$crate" "$snapshot/crates/"
  fi
done <"$snapshot/COVERED"
{
  echo "commit $(git -C "$checkout" rev-parse HEAD)"
  echo "date $(git -C "$checkout" show -s --format=%cI HEAD)"
  echo "advisories $(find "$snapshot/crates" -name '*.md' | wc -l)"
} >"$snapshot/SNAPSHOT"
cat "$snapshot/SNAPSHOT"
