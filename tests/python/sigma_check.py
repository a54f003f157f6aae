"""Loads every Sigma rule in a folder with pySigma, runs pySigma's validators on it, and
converts it to a Lucene query with pySigma's Elasticsearch backend.

    python3 sigma_check.py RULE_DIR NAME,NAME,...

The ATT&CK and D3FEND tag validators are skipped: they fetch MITRE's data over the network.
Prints one line per rule ("<file> <detection> <query>") and exits non-zero on any invalid
rule, any validator issue, a conversion error, or a detection name without exactly one rule.
"""

import pathlib
import sys

from sigma.backends.elasticsearch import LuceneBackend
from sigma.collection import SigmaCollection
from sigma.validation import SigmaValidator
from sigma.validators.core import validators


def main() -> int:
    folder = pathlib.Path(sys.argv[1])
    expected = set(sys.argv[2].split(","))
    # The ATT&CK and D3FEND tag validators download MITRE's data at run time; tests have no
    # network, so they are left out. Tag syntax is still checked (tag_format, namespace_tag).
    offline = [v for name, v in validators.items() if name not in ("attacktag", "d3_fendtag")]
    validator = SigmaValidator(offline)
    backend = LuceneBackend()
    seen: dict[str, list[str]] = {}
    failed = False
    files = sorted(folder.glob("*.yml"))
    if not files:
        print(f"no rules in {folder}")
        return 1
    for path in files:
        try:
            collection = SigmaCollection.from_yaml(path.read_text())
            issues = validator.validate_rules(collection)
            queries = backend.convert(collection)
        except Exception as e:  # pySigma raises its own error types for invalid rules
            print(f"{path.name}: invalid: {e}")
            failed = True
            continue
        for issue in issues:
            print(f"{path.name}: {issue}")
            failed = True
        for rule, query in zip(collection.rules, queries):
            if rule.logsource.product != "ewsgate":
                print(f"{path.name}: logsource product is {rule.logsource.product}")
                failed = True
            names = [
                str(value)
                for detection in rule.detection.detections.values()
                for item in detection.detection_items
                if getattr(item, "field", None) == "detection"
                for value in item.value
            ]
            for name in names:
                seen.setdefault(name, []).append(path.name)
            print(f"{path.name} {','.join(names)} {query}")
    for name in sorted(expected):
        if len(seen.get(name, [])) != 1:
            print(f"detection {name}: {len(seen.get(name, []))} rules {seen.get(name, [])}")
            failed = True
    for name in sorted(set(seen) - expected):
        print(f"rule for unknown detection {name}: {seen[name]}")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
