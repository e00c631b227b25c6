"""Interop with the official Huawei Cloud Python SDKs, pointed at the gateway.

Run by tests/sdk_interop.rs, which starts the simulator and the gateway and
passes their addresses. Exits non-zero on the first failed check.
"""
import os
import sys

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkdrs.v5 import DrsClient, ShowExportProgressRequest
from huaweicloudsdkroma.v2 import CheckAssetJobStatusRequest, RomaClient

GATEWAY = os.environ["PGW_GATEWAY_URL"]
PROJECT = os.environ["PGW_PROJECT"]
# The SDK always signs with some AK/SK; the gateway strips them.
AK, SK = "AKDUMMYCLIENT0000001", "dummyClientSecretKey000000000000000000000"


def config():
    c = HttpConfig.get_default_config()
    c.retry_times = 0
    return c


def client(builder, project):
    return (
        builder.with_credentials(BasicCredentials(AK, SK, project))
        .with_endpoints([GATEWAY])
        .with_http_config(config())
        .build()
    )


def check(condition, message):
    if not condition:
        print("FAIL:", message, file=sys.stderr)
        sys.exit(1)
    print("ok:", message)


drs = client(DrsClient.new_builder(), PROJECT)
answer = drs.show_export_progress(
    ShowExportProgressRequest(async_job_id="62a055ae-ce03-4232-beb6-46c83b8ef2b2", x_language="en-us")
)
check(answer.process_status == "pending", "DrsClient.show_export_progress parses process_status")

roma = client(RomaClient.new_builder(), PROJECT)
running = roma.check_asset_job_status(
    CheckAssetJobStatusRequest(instance_id="11111111-2222-3333-4444-555555555555", job_id="ff8080814dbd65d7014dbe0d84db0013")
)
check(running.status == "RUNNING", "RomaClient.check_asset_job_status parses status")
check(0.0 <= running.progress_percent <= 1.0, "progress_percent is a float in 0..1")

failed = roma.check_asset_job_status(
    CheckAssetJobStatusRequest(instance_id="11111111-2222-3333-4444-555555555555", job_id="fail-job_d0")
)
check(failed.status == "FAILED", "a failed job reads FAILED")
check(failed.reasons and failed.reasons[0].error_code == "ROMA.00000101", "reasons are parsed into AssetJobReason")

stranger = client(DrsClient.new_builder(), "99999999999999999999999999999999")
try:
    stranger.show_export_progress(ShowExportProgressRequest(async_job_id="62a055ae"))
    check(False, "an unknown project must raise")
except ClientRequestException as e:
    check(e.status_code == 403, f"unknown project raises ClientRequestException 403 (got {e.status_code})")
    check(e.error_code == "PGW.4030", f"error_code is the gateway's (got {e.error_code})")
    check(bool(e.request_id) and len(e.request_id) == 32, f"request_id comes from X-Request-Id (got {e.request_id})")
    check(PROJECT not in e.error_msg and "9999" in e.error_msg, "error_msg names the refused project")

try:
    drs.show_export_progress(ShowExportProgressRequest(async_job_id="bad.id"))
    check(False, "a malformed job id must raise")
except ClientRequestException as e:
    check(e.status_code == 400 and e.error_code == "PGW.4000", f"malformed id raises PGW.4000 (got {e.error_code})")

print("sdk interop: all checks passed")
