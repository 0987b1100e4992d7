import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from lorapipe.errors import InputError
from lorapipe.train.ranktable import (
    build_rank_table,
    merge_rank_tables,
    parse_device_range,
    read_hccn_conf,
)

HCCN = "\n".join(f"address_{i}=192.98.{i}.10\nnetdetect_{i}=192.98.{i}.1" for i in range(16)) + "\n"


@pytest.mark.parametrize("text, devices", [
    ("[0,8)", list(range(8))), ("[0,8]", list(range(8))), ("[4,8)", [4, 5, 6, 7]),
    ("[ 2 , 12 )", list(range(2, 12))), ("[10,16)", list(range(10, 16))),
])
def test_device_ranges(text, devices):
    assert parse_device_range(text) == devices


@pytest.mark.parametrize("text", ["0,8", "[8,8)", "[0,17)", "[a,b)"])
def test_bad_device_ranges(text):
    with pytest.raises(InputError, match="--device_num"):
        parse_device_range(text)


def test_cli_writes_the_hccl_schema(tmp_path):
    (tmp_path / "hccn.conf").write_text(HCCN)
    out = tmp_path / "rank_table.json"
    subprocess.run([sys.executable, str(REPO / "scripts/hccl_tools.py"), "--device_num", "[0,4)",
                    "--visible_devices", "4,5,6,7", "--server_ip", "10.0.0.1", "--hccn_conf",
                    str(tmp_path / "hccn.conf"), "--output", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text()) == {
        "version": "1.0", "server_count": "1",
        "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve", "device": [
            {"device_id": str(d), "device_ip": f"192.98.{d}.10", "rank_id": str(r)}
            for r, d in enumerate([4, 5, 6, 7])]}],
        "status": "completed"}


def test_missing_address_line_is_named(tmp_path):
    (tmp_path / "hccn.conf").write_text("address_0=1.1.1.1\n")
    ips = read_hccn_conf(tmp_path / "hccn.conf")
    with pytest.raises(InputError, match=r"hccn.conf: no address_1= line for device 1"):
        build_rank_table([0, 1], ["0", "1"], ips, "10.0.0.1", tmp_path / "hccn.conf")
    with pytest.raises(InputError, match="cannot read the device IP list"):
        read_hccn_conf(tmp_path / "missing.conf")


def test_merge_renumbers_ranks_across_nodes(tmp_path):
    (tmp_path / "hccn.conf").write_text(HCCN)
    ips = read_hccn_conf(tmp_path / "hccn.conf")
    node0 = build_rank_table(list(range(8)), [str(i) for i in range(8)], ips, "10.0.0.1")
    node1 = build_rank_table(list(range(8)), [str(i) for i in range(8)], ips, "10.0.0.2")
    merged = merge_rank_tables([node0, node1])
    assert merged["server_count"] == "2"
    ranks = [(s["server_id"], d["device_id"], d["rank_id"]) for s in merged["server_list"] for d in s["device"]]
    assert ranks == [("10.0.0.1", str(i), str(i)) for i in range(8)] + \
                    [("10.0.0.2", str(i), str(8 + i)) for i in range(8)]
    with pytest.raises(InputError, match="same server twice"):
        merge_rank_tables([node0, node0])



def test_missing_device_ips_come_from_hccn_tool(tmp_path, monkeypatch):
    """hccn.conf lacks device 5: like the official hccl_tools.py, ask `hccn_tool -i 5 -ip -g`. hccn_tool
    exists only on Ascend hosts; here a stand-in on PATH prints what the real one does."""
    tool = tmp_path / "bin" / "hccn_tool"
    tool.parent.mkdir()
    tool.write_text('#!/bin/sh\n[ "$2" = 5 ] && printf "ipaddr:192.98.5.10\\nnetmask:255.255.255.0\\n"\nexit 0\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    ips = {"4": "192.98.4.10"}
    table = build_rank_table([0, 1], ["4", "5"], ips, "10.0.0.1")
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.98.4.10", "192.98.5.10"]
    with pytest.raises(InputError, match=r"no address_6= line for device 6, and `hccn_tool -i 6 -ip -g` reported"):
        build_rank_table([0, 1], ["4", "6"], ips, "10.0.0.1", "hccn.conf")


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.1.1", "::1"])
def test_a_loopback_server_ip_is_refused(ip):
    with pytest.raises(InputError, match=f"server_ip {re.escape(ip)} is a loopback address"):
        build_rank_table([0], ["0"], {"0": "192.98.0.10"}, ip)
