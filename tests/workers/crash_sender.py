"""A sender process for the crash test: recover what a killed predecessor left in flight, then
send the campaign through Kannel. The test kills it with SIGKILL at random moments.

    python -m tests.workers.crash_sender STORE_URL CAMPAIGN_ID RATE   (gateway options in $CRASH_GATEWAY as JSON)
"""
from __future__ import annotations

import json
import os
import sys


def main() -> int:
    url, campaign_id, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    from blocks.kannel import KannelGateway
    from store.db import get_engine
    from smsflow.ratelimit import TokenBucket
    from tasks.send import recover_in_flight, send_messages

    gw = KannelGateway(**json.loads(os.environ["CRASH_GATEWAY"]))
    engine = get_engine(url)
    claimer = f"crash-{os.getpid()}"
    print("ready", flush=True)
    settled, replanned = recover_in_flight(engine, campaign_id, gw, claimer)
    stats = send_messages(engine, campaign_id=campaign_id, gateway=gw, bucket=TokenBucket(rate, capacity=5),
                          claimer=claimer, max_messages=10**6, lease_s=1)
    print(json.dumps({"settled": settled, "replanned": replanned, "submitted": stats.submitted}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
