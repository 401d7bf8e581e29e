"""org.metergateway.Model: announce the model artifact (gateway.model.announce).

Usage: main.py <artifact folder> <component version>"""

import logging
import sys


def main() -> None:
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from gateway.errors import ModelError
    from gateway.model.announce import main as announce

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 3:
        sys.exit("usage: main.py <artifact folder> <component version>")
    ipc = GreengrassCoreIPCClientV2()
    try:
        announce(ipc, sys.argv[1], sys.argv[2])
    except ModelError as exc:
        sys.exit(f"error: {exc}")
    finally:
        ipc.close()


if __name__ == "__main__":
    main()
