"""Snapshot templates and warm start: stratovirt-py beside QEMU -M microvm.

    .venv/bin/python benches/snapshot.py [--sizes 128,1024,4096] [--reps 5]
        [--snap-reps 3] [--clones 1,10,50] [--clone-mem 256] [--cold]
        [--parts snapshot,restore,clones,plot] [--json FILE] [--plot FILE]

Same test guest (``sv.hb=1``: one ``heartbeat N`` line per millisecond, N read from and
stored to guest RAM), same ``-m``, same command line for both VMMs.

* **snapshot**: boot, wait for ``heartbeat 5``, then time QMP ``stop`` + ``migrate``
  until ``query-migrate`` reports ``completed``. Ours: ``migrate file:DIR``; QEMU:
  ``migrate exec:cat > FILE``. Template disk usage is st_blocks (what ``du`` shows)
  next to the apparent size.
* **idle / dirty guest**: the guest by itself touches a few MiB. A *dirty* guest is booted
  with ``-initrd`` of random bytes, half its RAM (capped at ``--dirty-cap`` MiB, since
  our loader keeps the initrd below 896 MiB): both VMMs copy the initrd into guest RAM,
  so that much RAM holds incompressible, non-zero data.
* **restore**: process start -> the guest's first ``heartbeat`` line (it must continue
  the template's count). Ours: ``-incoming file:DIR`` (it resumes by itself). QEMU:
  ``-incoming "exec:cat FILE"``; the template was paused, so QEMU stays paused when the
  incoming migration completes: we poll ``query-status`` every ms over QMP and send
  ``cont`` as soon as it leaves ``inmigrate``; that is counted in QEMU's time. Both are
  polled on QMP the same way; our QMP-ready time (greeting read) is reported too.
  Templates are in the page cache unless ``--cold`` (then POSIX_FADV_DONTNEED on the
  template files before every restore, for both).
* **clones**: N VMs restored from one template of a dirty ``--clone-mem`` guest, all
  running at once; the sum of ``Pss`` from /proc/PID/smaps_rollup (split into anonymous
  and file-backed). Ours maps the template's memory file MAP_PRIVATE, so clones share
  its page-cache pages (and only the pages a guest touches are mapped at all); QEMU reads
  the stream into private anonymous memory in every clone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

PEERS = ("ours", "qemu")
NAMES = {"ours": "stratovirt-py", "pool": "stratovirt-py (warm pool)", "qemu": "QEMU"}


class Bench:
    def __init__(self, a, qemu: str, kernel: str, tmp: str):
        self.a = a
        self.qemu = qemu
        self.kernel = kernel
        self.tmp = tmp
        self.pool = C.Pool(tmp) if a.pool else None
        self.peers = ["ours"] + (["pool"] if self.pool else []) + (["qemu"] if qemu else [])
        self.seq = 0
        self.initrds = {}

    def env(self, peer: str):
        # "ours" is the VMM as its own process: never a pool, not even the default one
        return self.pool.env if peer == "pool" else C.NO_POOL_ENV

    # -- set-up -----------------------------------------------------------------
    def initrd(self, mem: int, state: str):
        if state == "idle":
            return None, 0
        size = min(mem // 2, self.a.dirty_cap) << 20
        if size not in self.initrds:
            path = os.path.join(self.tmp, f"initrd-{size >> 20}M")
            C.random_file(path, size)
            self.initrds[size] = path
        return self.initrds[size], size

    def argv(self, peer: str, mem: int, state: str, hb: int, extra=()):
        self.seq += 1
        qmp = os.path.join(self.tmp, f"{peer}-{self.seq}.qmp")
        rd, _ = self.initrd(mem, state)
        extra = list(extra) + (["-initrd", rd] if rd else [])
        append = f"sv.hb={hb}"
        if peer in ("ours", "pool"):
            return C.stratovirt_argv(self.kernel, mem, append, qmp, extra), qmp
        return C.qemu_argv(self.qemu, self.kernel, mem, append, qmp, extra), qmp

    # -- snapshot ---------------------------------------------------------------
    def make_template(self, peer: str, mem: int, state: str, hb: int, path: str) -> dict:
        argv, qmp = self.argv(peer, mem, state, hb)
        vm = C.Vmm(peer, argv, qmp, env=self.env(peer))
        try:
            vm.wait_heartbeat(120, min_n=5)
            q = vm.qmp()
            uri = f"exec:cat > {path}" if peer == "qemu" else f"file:{path}"
            t = time.perf_counter()
            q.execute("stop")
            q.execute("migrate", {"uri": uri})
            st = q.wait_migration()
            ms = (time.perf_counter() - t) * 1000
            if st != "completed":
                raise RuntimeError(f"{peer}: migration ended {st}: {q.execute('query-migrate')}")
            time.sleep(0.02)      # the last heartbeat line printed before `stop` is in
            beats = [int(C.HEARTBEAT.match(l).group(1)) for _, l in vm.lines
                     if C.HEARTBEAT.match(l)]
        finally:
            vm.quit()
        du = C.disk_usage(path)
        return {"ms": ms, "last_beat": max(beats), **du}

    # -- restore ----------------------------------------------------------------
    def restore(self, peer: str, mem: int, state: str, hb: int, path: str,
                last_beat: int) -> dict:
        if self.a.cold:
            C.drop_file_cache(C.tree_files(path))
        inc = f"exec:cat {path}" if peer == "qemu" else f"file:{path}"
        argv, qmp = self.argv(peer, mem, state, hb, ["-incoming", inc])
        vm = C.Vmm(peer, argv, qmp, env=self.env(peer))
        out = {}
        try:
            q = vm.qmp(timeout=120)
            out["qmp_ready"] = vm.qmp_ready_ms
            if peer == "qemu":
                while True:
                    st = q.execute("query-status")["status"]
                    if st != "inmigrate":
                        break
                    time.sleep(0.001)
                out["incoming_done"] = vm.ms(time.perf_counter())
                if st != "running":
                    q.execute("cont")
                out["cont_sent"] = vm.ms(time.perf_counter())
            t, n = vm.wait_heartbeat(120)
            if n <= last_beat:
                raise RuntimeError(f"{peer}: first heartbeat after restore is {n}, template "
                                   f"was at {last_beat}")
            out["running"] = t
            out["first_beat"] = n
            out["first_byte"] = vm.first_byte
            out["rss"] = C.smaps_rollup(vm.pid).get("Rss", 0)
        finally:
            vm.kill()
        return out

    # -- clones -----------------------------------------------------------------
    def clones(self, peer: str, n: int, mem: int, state: str, hb: int, path: str,
               last_beat: int) -> dict:
        inc = f"exec:cat {path}" if peer == "qemu" else f"file:{path}"
        vms = []
        t = time.perf_counter()
        try:
            for _ in range(n):
                argv, qmp = self.argv(peer, mem, state, hb, ["-incoming", inc])
                vms.append(C.Vmm(peer, argv, qmp, env=self.env(peer)))
            if peer == "qemu":
                for vm in vms:
                    q = vm.qmp(timeout=300)
                    while q.execute("query-status")["status"] == "inmigrate":
                        time.sleep(0.005)
                    q.execute("cont")
            for vm in vms:
                _, beat = vm.wait_heartbeat(300)
                assert beat > last_beat
            all_running = (time.perf_counter() - t) * 1000
            time.sleep(0.5)
            tot = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Pss_Shmem": 0}
            for vm in vms:
                r = C.smaps_rollup(vm.pid)
                for k in tot:
                    tot[k] += r.get(k, 0)
        finally:
            for vm in vms:
                vm.kill()
        return {"n": n, "all_running_ms": all_running, **tot}


def mib(b) -> str:
    return f"{b / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128,1024,4096", help="guest sizes, MiB, comma separated")
    ap.add_argument("--reps", type=int, default=5, help="restores per VMM, size and state")
    ap.add_argument("--snap-reps", type=int, default=3, help="snapshots per VMM, size and state")
    ap.add_argument("--states", default="idle,dirty")
    ap.add_argument("--dirty-cap", type=int, default=768, help="largest initrd, MiB")
    ap.add_argument("--hb", type=int, default=1, help="heartbeat interval (ms) of the template guest")
    ap.add_argument("--clones", default="1,10,50", help="clone counts")
    ap.add_argument("--fanout", default="16,50", help="restores started at once, comma separated")
    ap.add_argument("--clone-mem", type=int, default=256)
    ap.add_argument("--clone-state", default="dirty", choices=["idle", "dirty"])
    ap.add_argument("--cold", action="store_true", help="evict the template from the page cache before each restore")
    ap.add_argument("--parts", default="snapshot,restore,clones,fanout,plot")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--pool", action="store_true",
                    help="also measure stratovirt-py forking VMs from a warm stratovirt-pool")
    ap.add_argument("--dir", help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", default=str(C.REPO / "docs" / "restore-latency.png"))
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    states = [s for s in a.states.split(",") if s]
    counts = [int(s) for s in a.clones.split(",") if s]
    parts = set(a.parts.split(","))

    qemu = None if a.no_qemu else C.ensure_qemu()
    if not a.no_qemu and not qemu:
        return 2
    C.header("snapshot / restore / clones", qemu)
    kernel = C.guest_elf()
    tmp = C.bench_dir("svbench-snap-", a.dir)
    b = Bench(a, qemu, kernel, tmp)
    results = {"sizes": sizes, "states": states, "snapshot": {}, "restore": {}, "clones": {},
               "cold": a.cold, "hb_ms": a.hb}
    load = C.CpuLoad()
    try:
        if parts & {"snapshot", "restore", "plot"}:
            run_snap_restore(b, a, sizes, states, parts, results)
        if "clones" in parts:
            run_clones(b, a, counts, results)
        if "fanout" in parts:
            run_fanout(b, a, [int(n) for n in a.fanout.split(",") if n], results)
    finally:
        if b.pool:
            b.pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["cpu"] = C.CpuLoad.stop(load)
    cpu = results["cpu"]
    print(f"\nCPU during the run: {cpu['busy_pct']}% busy over {cpu['ncpu']} CPUs, loadavg "
          f"before {cpu['loadavg_before'][0]:.2f} after {cpu['loadavg_after'][0]:.2f}")
    if "plot" in parts and results["restore"]:
        plot(results, b.peers, a.plot)
    results["qemu"] = C.qemu_version(qemu) if qemu else None
    C.write_json(a.json, "snapshot", results)
    return 0


def run_snap_restore(b: Bench, a, sizes, states, parts, results) -> None:
    for mem in sizes:
        for state in states:
            key = f"{mem}/{state}"
            snaps = {p: [] for p in b.peers}
            keep = {}
            for i in range(max(1, a.snap_reps)):
                for p in b.peers:
                    path = os.path.join(b.tmp, f"tpl-{p}-{mem}-{state}-{i}")
                    r = b.make_template(p, mem, state, a.hb, path)
                    snaps[p].append(r)
                    if p in keep:
                        shutil.rmtree(keep[p][0], ignore_errors=True) if p != "qemu" \
                            else os.unlink(keep[p][0])
                    keep[p] = (path, r["last_beat"])
            results["snapshot"][key] = snaps
            _, rd_size = b.initrd(mem, state)
            print(f"{mem} MiB {state}: snapshot "
                  + ", ".join(f"{p} {C.median([s['ms'] for s in snaps[p]]):.1f} ms "
                              f"({mib(snaps[p][-1]['allocated'])} MiB on disk)" for p in b.peers)
                  + (f"  [initrd {rd_size >> 20} MiB]" if rd_size else ""), flush=True)
            if parts & {"restore", "plot"}:
                rs = {p: [] for p in b.peers}
                for _ in range(a.reps):
                    for p in b.peers:
                        path, last = keep[p]
                        rs[p].append(b.restore(p, mem, state, a.hb, path, last))
                results["restore"][key] = rs
                print(f"{mem} MiB {state}: restore -> running "
                      + ", ".join(f"{p} {C.median([r['running'] for r in rs[p]]):.1f} ms"
                                  for p in b.peers), flush=True)
            for p in b.peers:
                path = keep[p][0]
                shutil.rmtree(path, ignore_errors=True) if p != "qemu" else os.unlink(path)

    # ---- tables
    rows = []
    for mem in sizes:
        for state in states:
            snaps = results["snapshot"][f"{mem}/{state}"]
            o = C.median([s["ms"] for s in snaps["ours"]])
            q = C.median([s["ms"] for s in snaps["qemu"]]) if "qemu" in snaps else None
            od = snaps["ours"][-1]
            qd = snaps["qemu"][-1] if "qemu" in snaps else None
            rows.append([f"{mem} MiB {state}", C.fmt(o), C.fmt(q), C.ratio(o, q),
                         f"{mib(od['allocated'])} ({mib(od['apparent'])})",
                         f"{mib(qd['allocated'])} ({mib(qd['apparent'])})" if qd else "-"])
    C.table(["snapshot, median of %d" % a.snap_reps, "ours ms", "QEMU ms", "ours/QEMU",
             "ours disk MiB (apparent)", "QEMU disk MiB (apparent)"], rows,
            "Snapshot: stop + migrate until query-migrate says completed")
    if not results["restore"]:
        return
    rows = []
    for mem in sizes:
        for state in states:
            rs = results["restore"][f"{mem}/{state}"]
            o = C.quantiles([r["running"] for r in rs["ours"]])
            oq = C.median([r["qmp_ready"] for r in rs["ours"]])
            q = C.quantiles([r["running"] for r in rs["qemu"]]) if "qemu" in rs else {}
            qq = C.median([r["qmp_ready"] for r in rs["qemu"]]) if "qemu" in rs else None
            qi = C.median([r["incoming_done"] for r in rs["qemu"]]) if "qemu" in rs else None
            rows.append([f"{mem} MiB {state}", C.fmt(o["median"]),
                         f"{o['min']:.0f}-{o['max']:.0f}", C.fmt(oq),
                         C.fmt(q.get("median")),
                         f"{q['min']:.0f}-{q['max']:.0f}" if q else "-",
                         C.fmt(qq), C.fmt(qi), C.ratio(o["median"], q.get("median"))])
    C.table(["restore, median of %d" % a.reps, "ours -> running", "ours min-max",
             "ours QMP ready", "QEMU -> running", "QEMU min-max", "QEMU QMP ready",
             "QEMU incoming done", "ours/QEMU"], rows,
            "Restore: process start -> first heartbeat after restore (ms)"
            + (" [cold page cache]" if a.cold else " [template in page cache]"))
    if "pool" in b.peers:
        rows = []
        for mem in sizes:
            for state in states:
                rs = results["restore"][f"{mem}/{state}"]
                pq = C.quantiles([r["running"] for r in rs["pool"]])
                o = C.median([r["running"] for r in rs["ours"]])
                q = C.median([r["running"] for r in rs["qemu"]]) if "qemu" in rs else None
                rows.append([f"{mem} MiB {state}", C.fmt(pq["median"]),
                             f"{pq['min']:.0f}-{pq['max']:.0f}", C.fmt(o), C.fmt(q),
                             C.ratio(pq["median"], q)])
        C.table(["restore, median of %d" % a.reps, "pool -> running", "pool min-max",
                 "ours (own process)", "QEMU", "pool/QEMU"], rows,
                "Restore through stratovirt-pool: process start -> first heartbeat (ms)")
    rows = []
    for mem in sizes:
        for state in states:
            rs = results["restore"][f"{mem}/{state}"]
            rows.append([f"{mem} MiB {state}"] +
                        [mib(C.median([r["rss"] for r in rs[p]])) for p in b.peers])
    C.table(["RSS right after restore (MiB)"] + [NAMES[p] for p in b.peers], rows)


def run_clones(b: Bench, a, counts, results) -> None:
    mem, state = a.clone_mem, a.clone_state
    keep = {}
    for p in b.peers:
        path = os.path.join(b.tmp, f"clone-tpl-{p}")
        r = b.make_template(p, mem, state, 200, path)
        keep[p] = (path, r["last_beat"])
    _, rd = b.initrd(mem, state)
    rows = []
    for n in counts:
        row = {}
        for p in b.peers:
            if p == "qemu":
                need = n * ((mem if state == "dirty" else 32) + 80) << 20
                avail = meminfo("MemAvailable")
                if need > 0.8 * avail:
                    print(f"skipping {n} QEMU clones: need ~{need >> 20} MiB, "
                          f"{avail >> 20} MiB available", flush=True)
                    continue
            row[p] = b.clones(p, n, mem, state, 200, *keep[p])
            print(f"{n} clones {p}: sum PSS {mib(row[p]['Pss'])} MiB "
                  f"(anon {mib(row[p]['Pss_Anon'])}, file {mib(row[p]['Pss_File'])}), "
                  f"all running after {row[p]['all_running_ms']:.0f} ms", flush=True)
        results["clones"][n] = row
        o, q = row.get("ours"), row.get("qemu")
        rows.append([str(n), mib(o["Pss"]), mib(o["Pss_Anon"]), mib(o["Pss_File"]),
                     mib(o["Pss"] / n),
                     mib(q["Pss"]) if q else "-", mib(q["Pss_Anon"]) if q else "-",
                     mib(q["Pss"] / n) if q else "-", C.ratio(o["Pss"], q["Pss"] if q else None),
                     f"{o['all_running_ms']:.0f}", f"{q['all_running_ms']:.0f}" if q else "-"])
    C.table(["clones", "ours PSS", "ours anon", "ours file", "ours /clone",
             "QEMU PSS", "QEMU anon", "QEMU /clone", "ours/QEMU", "ours all running ms",
             "QEMU all running ms"], rows,
            f"Clones of one {mem} MiB {state} template"
            + (f" (initrd {rd >> 20} MiB of random data)" if rd else "")
            + ": sum of PSS over the VMM processes (MiB)")


def fanout(b: Bench, peer: str, n: int, mem: int, path: str, last_beat: int) -> dict:
    """``n`` restores of one template started as fast as possible; per VM, its own
    spawn -> first heartbeat after the restore (QEMU: incoming done, then ``cont``,
    each VM on its own thread so that no VM waits for another's turn)."""
    inc = f"exec:cat {path}" if peer == "qemu" else f"file:{path}"
    vms, lat, failed = [], [], 0
    try:
        for _ in range(n):
            argv, qmp = b.argv(peer, mem, "idle", 200, ["-incoming", inc])
            vms.append(C.Vmm(peer, argv, qmp, env=b.env(peer)))
        if peer == "qemu":
            def cont(vm):
                q = vm.qmp(timeout=300)
                while q.execute("query-status")["status"] == "inmigrate":
                    time.sleep(0.001)
                q.execute("cont")
            threads = [threading.Thread(target=cont, args=(vm,), daemon=True) for vm in vms]
            for t in threads:
                t.start()
        for vm in vms:
            try:
                t, beat = vm.wait_heartbeat(300)
                if beat <= last_beat:
                    raise RuntimeError(f"heartbeat {beat} after a template at {last_beat}")
                lat.append(t)
            except (RuntimeError, TimeoutError) as e:
                failed += 1
                print(f"{peer}: a restore failed: {e}", file=sys.stderr)
        time.sleep(0.3)
        pss = sum(C.smaps_rollup(vm.pid).get("Pss", 0) for vm in vms)
    finally:
        for vm in vms:
            vm.kill()
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")
    return {"n": n, "failed": failed, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "pss_per_vm": pss / n}


def run_fanout(b: Bench, a, counts, results) -> None:
    mem = a.clone_mem
    keep = {}
    for p in b.peers:
        path = os.path.join(b.tmp, f"fanout-tpl-{p}")
        r = b.make_template("ours" if p == "pool" else p, mem, "idle", 200, path)
        keep[p] = (path, r["last_beat"])
    rows = []
    results["fanout"] = {}
    for n in counts:
        row = {p: fanout(b, p, n, mem, *keep[p]) for p in b.peers}
        results["fanout"][n] = row
        q = row.get("qemu")
        for p in b.peers:
            r = row[p]
            rows.append([f"{n} at once", NAMES[p], str(r["failed"]),
                         *(f"{r[k]:.1f}" for k in ("p50", "p90", "p99")),
                         *(C.ratio(r[k], q[k]) if q and p != "qemu" else "-"
                           for k in ("p50", "p90", "p99")),
                         mib(r["pss_per_vm"])])
    C.table(["fan-out", "VMM", "failed", "p50 ms", "p90 ms", "p99 ms", "p50/QEMU", "p90/QEMU",
             "p99/QEMU", "PSS/VM MiB"], rows,
            f"Fan-out: N restores of one {mem} MiB idle template started at once, "
            "each timed from its own spawn to its first heartbeat")


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def plot(results, peers, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib, or the project's `bench` extra): "
              "no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ours": ("tab:blue", "stratovirt-py"), "pool": ("tab:green", "stratovirt-py, warm pool"),
              "qemu": ("tab:red", "QEMU 7.2")}
    sizes = results["sizes"]
    for p in peers:
        for state, ls in (("idle", "-"), ("dirty", "--")):
            xs, ys, lo, hi = [], [], [], []
            for mem in sizes:
                rs = results["restore"].get(f"{mem}/{state}")
                if not rs:
                    continue
                q = C.quantiles([r["running"] for r in rs[p]])
                xs.append(mem)
                ys.append(q["median"])
                lo.append(q["median"] - q["min"])
                hi.append(q["max"] - q["median"])
            if xs:
                color, name = styles[p]
                ax.errorbar(xs, ys, yerr=[lo, hi], color=color, linestyle=ls, marker="o",
                            capsize=3, label=f"{name}, {state} guest")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{m} MiB" if m < 1024 else f"{m // 1024} GiB" for m in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("guest memory")
    ax.set_ylabel("process start -> guest running again (ms)")
    ax.set_title("Restore latency (median, bars min-max; software KVM: compare ratios)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
