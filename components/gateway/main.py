"""org.metergateway.Gateway: the gateway under Greengrass (the agent is gateway.greengrass)."""

import logging
import sys


def main() -> None:
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from gateway.greengrass import GreengrassAgent, ipc_publisher, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ipc = GreengrassCoreIPCClientV2()
    try:
        code = serve(GreengrassAgent(ipc, publisher_factory=ipc_publisher(ipc)))
    finally:
        ipc.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
