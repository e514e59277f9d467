"""Puts a table file between `<!-- NAME:start -->` and `<!-- NAME:end -->` in BENCHMARKS.md
(appended at the end when the markers are not there yet).

    python3 load-tests/put_section.py NAME TABLE_FILE
"""
import re
import sys

name, path = sys.argv[1], sys.argv[2]
table = open(path).read()
start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
md = open("BENCHMARKS.md").read()
block = f"{start}\n{table}{end}"
if start in md:
    md = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, md, flags=re.S)
else:
    md = md + "\n" + block + "\n"
open("BENCHMARKS.md", "w").write(md)
