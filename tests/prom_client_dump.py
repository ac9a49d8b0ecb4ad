"""Print every sample of a Prometheus text file as read by the official Python client's
parser (PyPI prometheus-client), one JSON object per line: the independent reading that
tests/parse.rs compares `meshcanary parse` against. Values as repr() strings so NaN and
infinities survive JSON.

One known renaming is undone: the Python client reports the samples of a counter family as
`<family>_total` even when the text says `<family>` (an OpenMetrics habit), and strips
`_total` from family names. Families come out in the order of the file's `# TYPE` lines, so
each is paired with the TYPE line it came from and its counter samples get the name that
line declared."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

with open(sys.argv[1], encoding="utf-8") as f:
    text = f.read()
type_lines = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
families = list(text_string_to_metric_families(text))
if len(families) != len(type_lines):
    sys.exit(f"{len(families)} families but {len(type_lines)} TYPE lines: cannot pair them")

for family, (declared, kind) in zip(families, type_lines):
    for s in family.samples:
        name = s.name
        if kind == "counter" and name == family.name + "_total":
            name = declared
        print(json.dumps({"name": name, "labels": s.labels, "value": repr(float(s.value)),
                          "timestamp": s.timestamp}))
