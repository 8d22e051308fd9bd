"""moto's S3/IAM server on 127.0.0.1 with IAM enforcement switched on once set-up is done.

    with moto_with_iam(region) as moto:
        bucket = ...; moto.s3.create_bucket(...)           # set-up runs as an unchecked admin
        key, secret = moto.user("sl-school-1", policy)     # an IAM user with one inline policy
        moto.enforce()                                     # from here on, every request is checked

moto reads `INITIAL_NO_AUTH_ACTION_COUNT` when first imported (perhaps earlier in this process), so the running
server's count is also set through `/moto-api/reset-auth`; on exit enforcement is lifted and the server stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests


@dataclass
class MotoIam:
    endpoint: str
    region: str
    s3: Any
    iam: Any
    kms: Any

    def user(self, name: str, policy: dict[str, Any]) -> tuple[str, str]:
        """Create an IAM user with `policy` inline; its (access key id, secret)."""
        self.iam.create_user(UserName=name)
        self.iam.put_user_policy(UserName=name, PolicyName="inline", PolicyDocument=json.dumps(policy))
        key = self.iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enforce(self) -> None:
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()


@contextmanager
def moto_with_iam(region: str) -> Iterator[MotoIam]:
    previous = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "1000"  # before moto is imported: set-up runs as admin
    for k, v in {"AWS_ACCESS_KEY_ID": "admin", "AWS_SECRET_ACCESS_KEY": "admin"}.items():
        os.environ.setdefault(k, v)
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"1000", timeout=10).raise_for_status()
    admin = {"endpoint_url": endpoint, "region_name": region, "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    try:
        yield MotoIam(endpoint, region, *(boto3.client(s, **admin) for s in ("s3", "iam", "kms")))
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        requests.post(f"{endpoint}/moto-api/reset", timeout=10)
        server.stop()
        if previous is None:
            os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = previous
