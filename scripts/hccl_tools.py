#!/usr/bin/env python
"""Write an HCCL rank table for this node (the recipe's hccl_tools.py), to a path you choose."""

import json

from lorapipe import cli
from lorapipe.outputs import atomic_outputs
from lorapipe.train.ranktable import (
    build_rank_table,
    host_ip,
    parse_device_range,
    read_hccn_conf,
)


def main():
    p = cli.parser(__doc__)
    p.add_argument("--device_num", default="[0,8)", help='logical devices, "[0,8)" (or "[0,8]") = 0..7')
    p.add_argument("--visible_devices", default="0,1,2,3,4,5,6,7",
                   help="device ids behind the logical ids (containers may remap them)")
    p.add_argument("--server_ip", default="", help="this node's IP (default: resolve the host name)")
    p.add_argument("--hccn_conf", default="/etc/hccn.conf")
    p.add_argument("--device_num_per_node", type=int, default=16)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    params = {k: getattr(args, k) for k in ("device_num", "visible_devices", "server_ip")}
    run = cli.start(args, params, device_target="Ascend")
    server_ip = args.server_ip or host_ip()
    if not server_ip:
        raise cli.InputError("cannot resolve this host's IP; pass --server_ip")
    table = build_rank_table(parse_device_range(args.device_num, args.device_num_per_node),
                             args.visible_devices.split(","), read_hccn_conf(args.hccn_conf), server_ip,
                             args.hccn_conf)
    with atomic_outputs([args.output], run=run, inputs=[args.hccn_conf]) as (tmp,):
        tmp.write_text(json.dumps(table, indent=4) + "\n")


if __name__ == "__main__":
    cli.main_guard(main)
