"""The bench's issue-15 grid: MONITOR counting (against a real private Redis), the grid tables and the
target checks (pure functions over a results document)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis

from bench.commands import MonitorCounter, parse_monitor_line
from bench.grid_report import grid_cost_table, grid_table
from bench.harness import UNSAMPLED, DrainResult
from bench.peers.contenders import BULLMQ
from bench.scenarios import OURS, OURS_CONNS
from bench.targets import issue15_checks


def test_monitor_lines_are_told_apart_by_source() -> None:
    client = b'+1796143753.611037 [0 127.0.0.1:50512] "SET" "a" "1"\r\n'
    assert parse_monitor_line(client) == ("client", "SET")
    assert parse_monitor_line(b'+1796143753.611504 [0 lua] "hset" "k" "f" "v"\r\n') == ("lua", "HSET")
    unix = b'+1796143753.6 [3 unix:/tmp/r.sock] "EVALSHA" "ab" "0"\r\n'
    assert parse_monitor_line(unix) == ("client", "EVALSHA")
    assert parse_monitor_line(b"+OK\r\n") is None
    assert parse_monitor_line(b"-ERR something\r\n") is None


def test_monitor_counts_client_and_script_commands_of_a_real_redis(redis_url: str) -> None:
    where = urlsplit(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()  # the connection's handshake is made before counting starts
        counter = MonitorCounter(where.hostname or "127.0.0.1", where.port or 6379).start()
        client.set("a", "1")
        pipe = client.pipeline(transaction=True)
        pipe.incr("a")
        pipe.get("a")
        pipe.execute()
        client.eval("redis.call('set', KEYS[1], 'x'); return redis.call('get', KEYS[1])", 1, "b")
        count = counter.stop()
    finally:
        client.close()
    assert counter.error == ""
    # SET, MULTI, INCRBY, GET, EXEC, EVAL from the client; SET and GET inside the script
    assert (count.client, count.lua) == (6, 2)
    assert count.by_name["EVAL"] == 1 and count.by_name["lua:SET"] == 1 and "ECHO" not in count.by_name


def _drain(name: str, rtt: float, c: int, rate: float, **extra: Any) -> DrainResult:
    base: dict[str, Any] = {
        "scenario": name, "sink": "aiosmtpd", "rtt_ms": rtt, "workers": c, "processes": 1, "messages": 100,
        "delivered": 100, "connections": c, "ehlo": c, "quit": 0, "failed_jobs": 0, "left_in_queue": 0,
        "wall_s": 100 / rate, "msgs_per_s": rate, "steady_msgs_per_s": rate, "workers_exit_s": 1.0,
        "cpu_ms_total": 200.0, "cpu_ms_per_msg": 2.0, "startup_cpu_ms": 50.0, "cpu_ms_per_msg_net": 1.5,
        "peak_rss_mb": 40.0, "ok": True,
    }
    return DrainResult(**{**base, **extra})


def test_grid_table_has_a_row_per_cell_and_our_ratio_to_bullmq() -> None:
    results = [_drain(OURS, 0.0, 1, 300.0), _drain(BULLMQ, 0.0, 1, 400.0),
               _drain(OURS, 20.0, 4, 150.0), _drain(BULLMQ, 20.0, 4, 75.0)]
    text = grid_table(results)
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two cells
    assert "0.75x" in lines[2] and "2.00x" in lines[3]


def test_cost_table_splits_cpu_by_process_kind_net_of_start_up() -> None:
    kinds = {"supervisor": 60.0, "worker": 150.0, UNSAMPLED: 10.0}
    startup = {"supervisor": 50.0, "worker": 0.0, UNSAMPLED: 0.0}
    text = grid_cost_table([_drain(OURS, 0.0, 4, 300.0, cpu_kinds_ms=kinds, startup_kinds_ms=startup)])
    assert "supervisor 0.10, worker 1.50, exit 0.10" in text


def test_issue15_targets_take_our_better_configuration_and_say_both() -> None:
    rows = [_drain(OURS, 100.0, 16, 100.0, peak_pss_mb=240.0).as_dict(),
            _drain(OURS_CONNS, 100.0, 16, 90.0, peak_pss_mb=80.0).as_dict(),
            _drain(BULLMQ, 100.0, 16, 62.0).as_dict()]
    commands = [{"scenario": OURS, "workers": 16, "client_per_mail": 12.0, "lua_per_mail": 5.0,
                 "total_per_mail": 17.0}]
    doc = {"scenarios": {"peers": rows, "commands": commands}}
    found = {c.target: c for c in issue15_checks(doc)}
    vs = found["100 ms, C=16: dispatcher >= 1.5x BullMQ+Nodemailer"]
    assert vs.met is True and vs.measured.startswith("1.61x") and "1 process x C conns 1.45x" in vs.measured
    assert found["16 connections <= 120 MB PSS (summed over the worker processes)"].met is True
    assert found["100 ms: 1 process x 16 connections >= 80% of 16 processes"].measured == "90%"
    assert found["Redis commands per delivered mail <= 15 (client + inside Lua)"].met is False
    assert found["0 ms, C=1: dispatcher >= 1.0x BullMQ+Nodemailer"].met is None  # not measured: n/a
