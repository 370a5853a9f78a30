"""Validates one FHIR R4 (4.0.1) Bundle read as JSON on stdin.

Run with the venv deploy/fhir-validator.sh makes (fhir.resources 6.1.0, pydantic 1). Exits 0
and prints nothing when the Bundle is valid; otherwise prints why on stderr (pydantic names
each failing field by its path, e.g. `entry -> 2 -> resource -> status`) and exits 1. Exit 2
means the input was not a JSON object at all.
"""

import json
import sys

from fhir.resources import construct_fhir_element


def main() -> int:
    try:
        obj = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        print(f"not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(obj, dict):
        print(f"not a JSON object but {type(obj).__name__}", file=sys.stderr)
        return 2
    try:
        construct_fhir_element("Bundle", obj)
    except Exception as e:  # pydantic's ValidationError, or a wrong resourceType
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
