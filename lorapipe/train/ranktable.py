"""HCCL rank tables: the JSON that tells Ascend's collective library which device is which rank.

    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": ip, "device": [{"device_id": "0", "device_ip": ip, "rank_id": "0"}, ...],
                      "host_nic_ip": "reserve"}],
     "status": "completed"}

Every value is a string. Device IPs come from /etc/hccn.conf lines `address_<id>=<ip>`. Like the
recipe's hccl_tools.py, `--device_num "[0,8)"` and `"[0,8]"` both mean devices 0..7.
"""

import ipaddress
import json
import re
import socket
import subprocess
from pathlib import Path

from lorapipe.errors import InputError

_RANGE = re.compile(r"^\[\s*(\d+)\s*,\s*(\d+)\s*[\]\)]$")


def parse_device_range(text, per_node=16):
    """'[0,8)' or '[0,8]' -> [0, ..., 7] (the end is exclusive either way, as in hccl_tools.py)."""
    match = _RANGE.match(text.strip())
    if not match:
        raise InputError(f"--device_num {text!r}: expected a range like \"[0,8)\"")
    first, last = map(int, match.groups())
    if not first < last <= per_node:
        raise InputError(f"--device_num {text!r}: need first < last <= {per_node} devices per node")
    return list(range(first, last))


def read_hccn_conf(path):
    """{device_id: device_ip} from hccn.conf `address_<id>=<ip>` lines."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the device IP list ({e.strerror})") from None
    ips = {}
    for line in lines:
        key, _, value = line.strip().partition("=")
        if key.startswith("address_"):
            ips[key[len("address_"):]] = value.strip()
    return ips


def host_ip():
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def hccn_tool_ip(device_id):
    """A device's IP as `hccn_tool -i <id> -ip -g` reports it (first line `ipaddr:<ip>`), the way the
    official hccl_tools.py reads it; None where hccn_tool is missing or reports nothing."""
    try:
        out = subprocess.run(["hccn_tool", "-i", str(device_id), "-ip", "-g"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first.split(":", 1)[1].strip() or None if ":" in first else None


def check_server_ip(server_ip):
    """HCCL and the other nodes reach this node at server_ip: a loopback address cannot work (a host
    name that /etc/hosts maps to 127.0.1.1 resolves to one)."""
    try:
        loopback = ipaddress.ip_address(server_ip).is_loopback
    except ValueError:
        raise InputError(f"server_ip {server_ip!r} is not an IP address") from None
    if loopback:
        raise InputError(f"server_ip {server_ip} is a loopback address, which HCCL and other nodes cannot reach; "
                         f"set parallel.server_ip (--server_ip) to this node's address on the cluster network")


def build_rank_table(devices, visible_devices, device_ips, server_ip, hccn_conf="hccn.conf"):
    """One node's rank table for logical `devices`, mapped through `visible_devices` to device ids.
    A device missing from `device_ips` (hccn.conf) is asked of hccn_tool, as hccl_tools.py does."""
    check_server_ip(server_ip)
    if len(visible_devices) < len(devices) or max(devices) >= len(visible_devices):
        raise InputError(f"--visible_devices {','.join(visible_devices)} has no entry for logical device "
                         f"{max(devices)}")
    entries = []
    for rank, logical in enumerate(devices):
        device_id = str(visible_devices[logical])
        device_ip = device_ips.get(device_id) or hccn_tool_ip(device_id)
        if not device_ip:
            raise InputError(f"{hccn_conf}: no address_{device_id}= line for device {device_id}, and "
                             f"`hccn_tool -i {device_id} -ip -g` reported no address")
        entries.append({"device_id": device_id, "device_ip": device_ip, "rank_id": str(rank)})
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server_ip, "device": entries, "host_nic_ip": "reserve"}],
            "status": "completed"}


def merge_rank_tables(tables):
    """One multi-node table from per-node tables, ranks renumbered 0..N-1 in the order given."""
    servers, rank = [], 0
    for table in tables:
        for server in table["server_list"]:
            devices = []
            for device in server["device"]:
                devices.append(dict(device, rank_id=str(rank)))
                rank += 1
            servers.append(dict(server, device=devices))
    ids = [s["server_id"] for s in servers]
    if len(set(ids)) != len(ids):
        raise InputError(f"rank tables to merge name the same server twice: {ids}")
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers,
            "status": "completed"}


def load_rank_table(path):
    try:
        table = json.loads(Path(path).read_text())
        table["server_list"][0]["device"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise InputError(f"{path}: not an HCCL rank table (expected server_list[].device[])") from None
    return table
