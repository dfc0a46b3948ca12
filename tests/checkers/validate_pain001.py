"""Validates ISO 20022 pain.001 files against the official XSD that the sepaxml package ships,
with lxml: an implementation independent of Tandem's. Usage: validate_pain001.py FILE...
Exits 0 when every file is valid; prints each error otherwise."""
import os
import sys

import sepaxml
from lxml import etree

SCHEMAS = os.path.join(os.path.dirname(sepaxml.__file__), "schemas")


def main(paths):
    failed = False
    for path in paths:
        document = etree.parse(path)
        namespace = etree.QName(document.getroot()).namespace or ""
        version = namespace.rsplit(":", 1)[-1]
        schema_path = os.path.join(SCHEMAS, version + ".xsd")
        if not os.path.exists(schema_path):
            print(f"{path}: no schema for {namespace!r} in sepaxml", file=sys.stderr)
            failed = True
            continue
        schema = etree.XMLSchema(etree.parse(schema_path))
        if schema.validate(document):
            print(f"{path}: valid {version}")
        else:
            failed = True
            for error in schema.error_log:
                print(f"{path}:{error.line}: {error.message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
