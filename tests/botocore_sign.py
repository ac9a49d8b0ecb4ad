"""Sign a request with botocore's SigV4 (an implementation independent of aws-sigv4) at a
given X-Amz-Date, and print the Authorization header. Input: JSON on stdin with method, url,
headers (those meshcanary sent, minus Authorization), body_hex, key, secret, token, region,
service. Used by tests/sigv4.rs to check that the two implementations agree."""
import datetime
import json
import sys
import types

import botocore.auth as auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

a = json.load(sys.stdin)
fixed = datetime.datetime.strptime(a["headers"]["x-amz-date"], "%Y%m%dT%H%M%SZ")


class FixedDateTime(datetime.datetime):
    @classmethod
    def utcnow(cls):
        return fixed

    @classmethod
    def now(cls, tz=None):
        return fixed.replace(tzinfo=tz) if tz else fixed


auth.datetime = types.SimpleNamespace(datetime=FixedDateTime, timezone=datetime.timezone,
                                      timedelta=datetime.timedelta)
request = AWSRequest(method=a["method"], url=a["url"], data=bytes.fromhex(a["body_hex"]),
                     headers=a["headers"])
auth.SigV4Auth(Credentials(a["key"], a["secret"], a["token"]), a["service"], a["region"]).add_auth(request)
print(request.headers["Authorization"])
