"""The `openstack cloudlet ...` plugin (python-openstackclient's `openstack.cli.extension`
contract): the client is the openstacksdk proxy `conn.cloudlet`."""

from __future__ import annotations

from typing import Any

from osc_lib import utils

from cloudletclient.sdk import register

API_NAME = "cloudlet"
API_VERSION_OPTION = "os_cloudlet_api_version"
API_VERSIONS = {"1": "cloudletclient.sdk.proxy.Proxy"}
DEFAULT_API_VERSION = "1"


def make_client(instance: Any) -> Any:
    return register(instance.sdk_connection).cloudlet


def build_option_parser(parser: Any) -> Any:
    parser.add_argument(
        "--os-cloudlet-api-version",
        metavar="<cloudlet-api-version>",
        default=utils.env("OS_CLOUDLET_API_VERSION", default=DEFAULT_API_VERSION),
        help="cloudlet API version (Env: OS_CLOUDLET_API_VERSION)",
    )
    return parser
