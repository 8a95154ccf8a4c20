"""Runs normswap command lines in this process and prints, as JSON, each one's exit code and stderr.

The permission cases start it under ``setpriv`` without root's override, so that a chmod-000 file is
unreadable even when the tests run as root (as CI does); one process serves them all, paying the imports once.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from normswap.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
print(json.dumps(results))
