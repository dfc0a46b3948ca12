#!/usr/bin/env bash
# The supply-chain check: cargo-deny with deny.toml over Cargo.lock (advisories, licences,
# duplicate versions, sources), offline. Advisories come from the vendored RustSec snapshot
# (deploy/supply-chain/advisory-db), unpacked as the git checkout cargo-deny reads, dated with
# the snapshot's own date so that deny.toml's staleness bound applies to it.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_cargo_deny
cd "$REPO_ROOT"
snapshot=deploy/supply-chain/advisory-db
uncovered=$(comm -23 <(grep '^name = ' Cargo.lock | sed 's/name = "\(.*\)"/\1/' | sort -u) "$snapshot/COVERED")
if [[ -n "$uncovered" ]]; then
  die "Cargo.lock has crates the advisory snapshot did not cover: $(echo "$uncovered" | tr '\n' ' ')
refresh it: bash deploy/supply-chain/refresh-advisories.sh <advisory-db checkout>"
fi
# cargo-deny keeps the database for the URL in deny.toml under this name.
db="$HOME/.cache/tandem/advisory-dbs/advisory-db-3157b0e258782691"
taken=$(sed -n 's/^date //p' "$snapshot/SNAPSHOT")
rm -rf "$db"
mkdir -p "$db"
cp -r "$snapshot/crates" "$db/"
git -C "$db" init -q
git -C "$db" add crates
GIT_AUTHOR_DATE="$taken" GIT_COMMITTER_DATE="$taken" \
  git -C "$db" -c user.name=tandem -c user.email=tandem@localhost commit -q -m "RustSec snapshot $(sed -n 's/^commit //p' "$snapshot/SNAPSHOT")"
# The database's age is the snapshot's, not the unpacking's.
touch -d "$taken" "$db/.git/FETCH_HEAD" "$db/.git/HEAD"
# cargo deny reads the crates' manifests offline: have them downloaded (a fresh machine that
# runs only the test command has built nothing yet).
cargo fetch --locked --quiet
log "cargo deny (advisories as of $taken)"
"$TANDEM_CARGO_DENY" deny --offline check
