"""An EWS client the way users run one: exchangelib against ewsgate.

Usage: ews_client.py URL USER PASSWORD CA_FILE
Prints one JSON line: what the calendar, the contacts and the inbox gave.
"""
import datetime
import json
import sys

from exchangelib import (DELEGATE, BASIC, Account, Build, Configuration,
                         Credentials, EWSDateTime, EWSTimeZone, Version)
from exchangelib.protocol import BaseProtocol


def main():
    url, user, password, ca = sys.argv[1:5]
    # The lab CA signs the gate's certificate; requests reads it from here.
    import os
    os.environ["REQUESTS_CA_BUNDLE"] = ca
    BaseProtocol.RETRY_WAIT = 0
    config = Configuration(
        service_endpoint=url,
        credentials=Credentials(user, password),
        auth_type=BASIC,
        version=Version(build=Build(15, 1, 2507, 6)),
        max_connections=1,
    )
    account = Account(primary_smtp_address=user, config=config,
                      autodiscover=False, access_type=DELEGATE)
    out = {}
    tz = EWSTimeZone("UTC")
    start = EWSDateTime(2026, 11, 1, tzinfo=tz)
    end = start + datetime.timedelta(days=30)
    out["calendar"] = sorted(i.subject for i in account.calendar.view(start=start, end=end))
    out["contacts"] = sorted(i.subject for i in account.contacts.all())
    try:
        out["inbox"] = sorted(i.subject for i in account.inbox.all())
    except Exception as e:  # the error exchangelib raises is what the user sees
        out["inbox_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
