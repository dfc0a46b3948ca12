"""Checks a Tandem statement's JSON export the way a partner would, with nothing but Python's
standard library: writes its rows back as the canonical CSV and compares the SHA-256 with the
export's content hash (and, if given, with a hash obtained elsewhere).
Usage: verify_statement_json.py statement.json [expected_hash]"""
import csv
import hashlib
import io
import json
import sys


def canonical_csv(export):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # minimal quoting, as RFC 4180
    writer.writerow(export["columns"])
    for row in export["rows"]:
        writer.writerow([row[column] for column in export["columns"]])
    return out.getvalue().encode("utf-8")


def main(path, expected=None):
    with open(path, encoding="utf-8") as handle:
        export = json.load(handle)
    computed = hashlib.sha256(canonical_csv(export)).hexdigest()
    claimed = expected or export["content_hash"]
    if computed != claimed:
        print(f"{path}: sha256 {computed} does not match {claimed}", file=sys.stderr)
        return 1
    print(f"{path}: sha256 {computed} matches")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
