"""bench/vs_qemu.py's verdicts and tables: issue 12's targets judged from one run's JSON, and the
markdown that bench/RESULTS.md takes (`vs_qemu.py --table RUN.json`). No QEMU, no daemons: what
tests/test_vs_qemu.py checks without either."""

from __future__ import annotations

from typing import Any


def crypto_share(bulk: dict[str, Any]) -> dict[str, Any]:
    """What the AEAD costs the bulk copy: the sealed median against the clear one, and the part of
    the gap to iperf3 that the clear copy closes."""
    sealed = bulk["migrated"]["mib_s"]["median"]
    clear = bulk["migrated_clear_not_production"]["mib_s"]["median"]
    iperf = bulk["iperf3_one_stream_mib_s"]["median"]
    slowdown = round(100 * (clear - sealed) / clear, 1) if sealed is not None and clear else None
    gap = iperf - sealed if iperf is not None and sealed is not None and clear is not None else None
    share = round(100 * (clear - sealed) / gap, 1) if gap and gap > 0 else None
    return {"slowdown_percent": slowdown, "share_of_gap_to_iperf3_percent": share}


# ---------------------------------------------------------------------------- targets


def evaluate(results: dict[str, Any], limits: list[int]) -> dict[str, Any]:
    """Issue 12's targets, pass/fail with the numbers they were judged on; where the run has QEMU
    over TLS, the same targets against it too (`*_over_tls`: QEMU doing the same work)."""
    targets: dict[str, Any] = {}
    if "bulk" in results:
        b = results["bulk"]
        ours, qemu, iperf = b["migrated"]["mib_s"]["median"], b["qemu"]["mib_s"]["median"], b["iperf3_one_stream_mib_s"]
        targets["bulk_at_least_iperf3"] = _verdict(
            ours is not None and ours >= iperf["median"], migrated=ours, iperf3=iperf["median"]
        )
        targets["bulk_at_least_2x_qemu"] = _verdict(
            ours is not None and qemu is not None and ours >= 2 * qemu, migrated=ours, qemu=qemu
        )
        if "qemu_tls" in b:
            over_tls = b["qemu_tls"]["mib_s"]["median"]
            targets["bulk_at_least_2x_qemu_over_tls"] = _verdict(
                ours is not None and over_tls is not None and ours >= 2 * over_tls, migrated=ours, qemu_tls=over_tls
            )
    if "boot_sector" in results:
        lines = results["boot_sector"]["lines"]
        high, low = limits[0], limits[-1]
        m = lines.get(f"m{high}off")
        for qemu_label, suffix in ((f"q{high}", ""), (f"qtls{high}", "_over_tls")):
            q = lines.get(qemu_label)
            if q and m:
                qs, ms = q["summary"], m["summary"]
                qt, mt = qs["total_ms"]["median"], ms["total_ms"]["median"]
                qd, md = qs["downtime_ms"]["median"], ms["downtime_ms"]["median"]
                targets[f"boot_{high}ms_total_le_qemu{suffix}"] = _verdict(_le(mt, qt), migrated=mt, qemu=qt)
                targets[f"boot_{high}ms_downtime_le_half_qemu{suffix}"] = _verdict(
                    _le(md, None if qd is None else qd / 2), migrated=md, qemu=qd
                )
                ql, ml = qs["downtime_to_target_loaded_ms"]["median"], ms["downtime_to_target_loaded_ms"]["median"]
                targets[f"boot_{high}ms_downtime_to_target_loaded_le_half_qemu{suffix}"] = _verdict(
                    _le(ml, None if ql is None else ql / 2), migrated=ml, qemu=ql
                )
        ours = [(label, r) for label, line in lines.items() if line["engine"] == "migrated" for r in line["runs"]]
        done = [r for _, r in ours if r["completed"]]
        exact = sum(1 for r in done if r["memory"]["ok"])
        targets["boot_memory_exact_every_time"] = _verdict(
            bool(done) and exact == len(done), exact=exact, completed=len(done)
        )
        m_low = lines.get(f"m{low}off")
        if m_low and low != high:
            runs = m_low["runs"]
            downtimes = [r["downtime_ms"] for r in runs if r["completed"]]
            ok = bool(runs) and len(downtimes) == len(runs) and all(d <= low for d in downtimes)
            targets[f"boot_{low}ms_completes_within_limit"] = _verdict(
                ok, completed=f"{len(downtimes)}/{len(runs)}", downtime_ms=downtimes
            )
    return targets


def _le(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b


def _verdict(passed: bool, **numbers: Any) -> dict[str, Any]:
    return {"pass": passed, **numbers}


# ---------------------------------------------------------------------------- tables


def _cell(figure: dict[str, Any] | None) -> str:
    if not figure or figure.get("median") is None:
        return "-"
    low, high = figure["range"]
    return f"{figure['median']:g} ({low:g}-{high:g})"


def _clear_rows(b: dict[str, Any]) -> list[str]:
    clear, share = b["migrated_clear_not_production"], b["crypto_share"]
    return [
        f"| migrated, stream protection OFF (test-only, not a production mode) | {_cell(clear['mib_s'])} | "
        f"{', '.join(str(r['mib_s']) for r in clear['runs'])} |",
        f"| the crypto's share | slows the copy {share['slowdown_percent']}% | "
        f"{share['share_of_gap_to_iperf3_percent']}% of the gap to iperf3 |",
    ]


def _reserve_rows(b: dict[str, Any]) -> list[str]:
    reserve = b["migrated_ram_reserve"]
    marked = ", ".join(f"{r['mib_s']}{' (reserve)' if r['ram_from_reserve'] else ' (fresh)'}" for r in reserve["runs"])
    return [
        f"| migrated, target RAM from its reserve ({reserve['from_reserve']} runs; not the fresh-target figure) | "
        f"{_cell(reserve['mib_s'])} | {marked} |"
    ]


def markdown(results: dict[str, Any]) -> str:
    """The tables of bench/RESULTS.md from one run's JSON: median (min-max)."""
    out: list[str] = []
    if "boot_sector" in results:
        out += [
            "| line | engine | mode | limit ms | completed | memory exact | total ms | downtime ms "
            "(engine's own) | downtime to target loaded ms | target RAM from its reserve |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, line in results["boot_sector"]["lines"].items():
            mode = line.get("dirty_tracking") or f"verify {line.get('verify')}"
            s = line["summary"]
            out.append(
                f"| {label} | {line['engine']} | {mode} | {line['limit_ms']} | {s['completed']} | "
                f"{s['memory_exact']} | {_cell(s['total_ms'])} | {_cell(s['downtime_ms'])} | "
                f"{_cell(s['downtime_to_target_loaded_ms'])} | {s.get('ram_from_reserve', '-')} |"
            )
        out.append("")
    if "bulk" in results:
        b = results["bulk"]
        runs = {e: ", ".join(str(r["mib_s"]) for r in b[e]["runs"]) for e in ("qemu", "migrated")}
        out += [
            f"| bulk copy, {b['guest_mib']} MiB | MiB/s median (range) | runs |",
            "|---|---|---|",
            f"| QEMU | {_cell(b['qemu']['mib_s'])} | {runs['qemu']} |",
            *(
                [
                    f"| QEMU over TLS (x509: the same protection as migrated's) | {_cell(b['qemu_tls']['mib_s'])} | "
                    f"{', '.join(str(r['mib_s']) for r in b['qemu_tls']['runs'])} |"
                ]
                if "qemu_tls" in b
                else []
            ),
            f"| migrated | {_cell(b['migrated']['mib_s'])} | {runs['migrated']} |",
            f"| migrated, bulk phase only | {_cell(b['migrated']['bulk_phase_mib_s'])} | |",
            *(_clear_rows(b) if "migrated_clear_not_production" in b else []),
            *(_reserve_rows(b) if "migrated_ram_reserve" in b else []),
            f"| iperf3, one stream (before, after) | {_cell(b['iperf3_one_stream_mib_s'])} | "
            f"{', '.join(str(x) for x in b['iperf3_one_stream_mib_s']['runs'])} |",
            "",
        ]
    if results.get("targets"):
        out += ["| issue 12 target | pass | figures |", "|---|---|---|"]
        for name, verdict in results["targets"].items():
            figures = ", ".join(f"{k} {v}" for k, v in verdict.items() if k != "pass")
            out.append(f"| {name} | {'yes' if verdict['pass'] else 'NO'} | {figures} |")
    return "\n".join(out)
