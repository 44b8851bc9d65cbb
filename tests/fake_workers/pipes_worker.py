"""A worker that speaks Dagster Pipes but never sends its final report (tests/fake_workers/worker.sh).

``no-report``: opens the Pipes session, logs, closes it, exits 0.
``hang READY_FILE``: opens the session, logs, writes READY_FILE, then sleeps until it is killed
(a worker killed mid-run).
"""

import json
import sys
import time

from dagster_pipes import PipesMappingParamsLoader, open_dagster_pipes

payload = json.loads(sys.stdin.read())
with open_dagster_pipes(params_loader=PipesMappingParamsLoader(payload["pipes"])) as pipes:
    pipes.log.info("fake worker: working")
    pipes.report_custom_message({"progress": {"read": 1}})
    if sys.argv[1] == "hang":
        pipes.log.info("fake worker: waiting to be killed")
        with open(sys.argv[2], "w") as ready:
            ready.write("ready\n")
        time.sleep(300)
