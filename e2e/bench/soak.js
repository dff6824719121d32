// The soak of issue 13: ferry relays encrypted messages both ways between linked rooms on a real homeserver
// (FERRY_E2E_HS=dendrite|synapse) at a fixed rate for many minutes, is restarted twice on the way (SIGTERM + start
// just after one third, SIGKILL + start just after two thirds, between samples), and the resources of every
// process are sampled each interval:
//
//   ferry       RSS (/proc/<pid>/status VmRSS), Go heap and goroutines (its metrics endpoint), open fds, its TCP
//               sockets by peer (Postgres, homeserver, pushes in), CPU share, inbox depth, relay latency
//               (its histogram)
//   Postgres    connections to ferry's database (pg_stat_activity), CPU share of the cluster's processes
//   homeserver  RSS and CPU share; this process (the clients) RSS and CPU share; /proc/loadavg and the machine's
//               busy share of CPU (/proc/stat)
//
// FERRY_SOAK_PAIRS pairs of rooms (A_i linked to B_i), each room with FERRY_SOAK_SENDERS matrix-js-sdk members
// (Rust crypto) who all send and all receive. The rate is the total over every direction (A_i→B_i and B_i→A_i),
// spread evenly over the directions and, within one, over its senders in turn. js-sdk sends one event at a time
// per client, so a sender with more than FERRY_SOAK_MAX_QUEUE messages queued skips its turn (counted as
// "skipped": the homeserver did not keep up with the rate). The harness' users are not rate-limited (Synapse:
// rc_message 1000/s from scripts/synapse.sh; Dendrite: rate limiting off; ferry's ghosts: rate_limited false).
// Every member decrypts every event of its room (js-sdk decrypts all of them); each copy is counted per receiving
// member by distinct event ID, so at the end every message must have arrived exactly once at every member of the
// other room. Latency: from the homeserver accepting the original (sendEvent resolved) to the receiving member
// having the copy's plaintext.
//
// Before the soak, FERRY_SOAK_PROBE_S seconds (default 30) of the fastest direct sends the same senders manage
// (each one at a time, into rooms without ferry) measure what the homeserver sustains on its own.
//
//   FERRY_PG_FSYNC=on scripts/with-postgres.sh scripts/node22 e2e/bench/soak.js [minutes] [rate]
//
// Env: FERRY_SOAK_PAIRS (default 1), FERRY_SOAK_SENDERS (per room, default 3), FERRY_SOAK_SAMPLE_S (default 60),
// FERRY_SOAK_PROBE_S (30; 0 skips; minutes 0 runs only the probe), FERRY_SOAK_DRAIN_S (how long to wait for the
// last copies, default 600), FERRY_SOAK_MAX_QUEUE (default 20), FERRY_SOAK_HS_PG=1 (Synapse on a database of the
// same Postgres cluster instead of SQLite), FERRY_SOAK_JSON (write every sample and the summary there).
// Exits 1 if a copy is missing, doubled or undecryptable at the end.
import fs from "node:fs";
import { execFileSync } from "node:child_process";
import os from "node:os";
import { performance } from "node:perf_hooks";
import matrixSdk from "matrix-js-sdk";
import { HS_LABEL } from "../lib/homeserver.js";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { buckets, histQuantile, msum, scrape } from "../lib/metrics.js";
import { freePort, sleep } from "../lib/util.js";

const { RoomEvent, MatrixEventEvent } = matrixSdk;
const minutes = Number(process.argv[2] ?? 30);
const rate = Number(process.argv[3] ?? 100);
const env = (k, d) => Number(process.env[k] ?? d);
const nSenders = env("FERRY_SOAK_SENDERS", 3);
const sampleS = env("FERRY_SOAK_SAMPLE_S", 60);
const probeS = env("FERRY_SOAK_PROBE_S", 30);
const drainS = env("FERRY_SOAK_DRAIN_S", 600);
const maxQueue = env("FERRY_SOAK_MAX_QUEUE", 20);
const HZ = 100; // clock ticks per second of /proc/<pid>/stat on Linux
const quantile = (xs, q) => {
    if (!xs.length) return NaN;
    const s = Float64Array.from(xs).sort();
    return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};
const round = (x, d = 0) => (Number.isFinite(x) ? Number(x.toFixed(d)) : null);

// ---- /proc ----------------------------------------------------------------------------------------------------
const readProc = (p) => {
    try {
        return fs.readFileSync(p, "utf8");
    } catch {
        return null;
    }
};
const rssMB = (pid) => {
    const m = readProc(`/proc/${pid}/status`)?.match(/^VmRSS:\s+(\d+) kB/m);
    return m ? Number(m[1]) / 1024 : NaN;
};
/** utime + stime of a process, in seconds (NaN once it is gone). */
const cpuSeconds = (pid) => {
    const s = readProc(`/proc/${pid}/stat`);
    if (!s) return NaN;
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / HZ; // fields 14 and 15, counted after the comm
};
/** CPU seconds of the children a process has waited for (cutime + cstime). */
const childCpuSeconds = (pid) => {
    const s = readProc(`/proc/${pid}/stat`);
    if (!s) return NaN;
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return (Number(f[13]) + Number(f[14])) / HZ;
};
/** The machine's CPU time so far: { busy, total } in ticks, from /proc/stat. */
const machineCpu = () => {
    const f = readProc("/proc/stat").split("\n")[0].trim().split(/\s+/).slice(1, 9).map(Number);
    const total = f.reduce((a, b) => a + b, 0);
    return { busy: total - f[3] - f[4], total }; // idle and iowait
};
const ppidOf = (pid) => {
    const s = readProc(`/proc/${pid}/stat`);
    return s ? Number(s.slice(s.lastIndexOf(")") + 2).split(" ")[1]) : -1;
};
const allPids = () => fs.readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number);
const socketInodes = (pid) => {
    let fds = [];
    try {
        fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
        return { fds: NaN, sockets: [] };
    }
    const sockets = [];
    for (const fd of fds) {
        try {
            const m = fs.readlinkSync(`/proc/${pid}/fd/${fd}`).match(/^socket:\[(\d+)\]$/);
            if (m) sockets.push(m[1]);
        } catch {
            // closed meanwhile
        }
    }
    return { fds: fds.length, sockets };
};
/** inode -> { local, remote, state } of every TCP socket (IPv4 and IPv6) in this network namespace. */
function tcpTable() {
    const out = new Map();
    for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
        for (const line of (readProc(f) ?? "").split("\n").slice(1)) {
            const c = line.trim().split(/\s+/);
            if (c.length < 10) continue;
            out.set(c[9], { local: parseInt(c[1].split(":")[1], 16), remote: parseInt(c[2].split(":")[1], 16), state: c[3] });
        }
    }
    return out;
}
/** The PID of the process holding the socket that listens on loopback `port`. */
function pidListening(port) {
    const listeners = new Set([...tcpTable()].filter(([, s]) => s.state === "0A" && s.local === port).map(([inode]) => inode));
    for (const pid of allPids()) {
        if (socketInodes(pid).sockets.some((i) => listeners.has(i))) return pid;
    }
    return null;
}

// ---- the stack ----------------------------------------------------------------------------------------------------
const metricsPort = await freePort();
const metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
// FERRY_SOAK_HS_PG=1: Synapse on its own database in the same Postgres cluster instead of SQLite (as
// FERRY_E2E_SYNAPSE_DB=postgres, lib/synapse.js).
if (process.env.FERRY_SOAK_HS_PG === "1") process.env.FERRY_E2E_SYNAPSE_DB = "postgres";
const stack = await startStack({
    extraConfig: { logging: { min_level: "info" }, metrics: { enabled: true, listen: `127.0.0.1:${metricsPort}` } },
});
const adminPg = process.env.FERRY_TEST_PG;
const pgPort = Number(new URL(adminPg).port || 5432);
const hsPort = stack.hs.port ?? Number(new URL(stack.hs.url).port);
const ferryPort = stack.prepared.port;
const hsPid = pidListening(hsPort);
const pgData = process.env.FERRY_TEST_PG_DATA;
const postmasterPid = pgData ? Number(readProc(`${pgData}/postmaster.pid`)?.split("\n")[0]) : null;
const pgPids = () => (postmasterPid ? [postmasterPid, ...allPids().filter((p) => ppidOf(p) === postmasterPid)] : []);
// The cluster's CPU so far: its live processes, plus the backends that exited (the postmaster reaped them).
const pgCpuSeconds = () => pgPids().reduce((s, p) => s + (cpuSeconds(p) || 0), 0) + (postmasterPid ? childCpuSeconds(postmasterPid) || 0 : 0);
const pgConnections = () =>
    Number(execFileSync("psql", [adminPg, "-X", "-qtA", "-c", `SELECT count(*) FROM pg_stat_activity WHERE datname = '${stack.database.name}'`], { encoding: "utf8" }).trim());

const users = [];
const stopAll = async () => {
    await Promise.all(users.map((u) => u.stop()));
    await stack.stop();
};
process.on("SIGINT", () => stopAll().finally(() => process.exit(130)));

const side = async (label) => {
    const members = await Promise.all(Array.from({ length: nSenders }, (_, i) => createUser(stack.hs.url, `${label}${i}`)));
    users.push(...members);
    return members;
};
// FERRY_SOAK_PAIRS linked pairs (default 1): ferry relays each source room's events one after another, so one pair
// relays at most one message per homeserver send round trip each way; more pairs spread the rate.
const nPairs = env("FERRY_SOAK_PAIRS", 1);
const pairs = [];
for (let p = 0; p < nPairs; p++) {
    const [sideA, sideB] = await Promise.all([side(`a${p}`), side(`b${p}`)]);
    pairs.push({ sideA, sideB });
}
const room = async (members, name, bot) => {
    const [owner, ...rest] = members;
    const roomId = await owner.createEncryptedRoom({ name, invite: rest.map((u) => u.userId) });
    for (const u of rest) await u.join(roomId);
    if (bot) await inviteBot(stack, owner, roomId);
    for (const u of members) for (const v of members) await u.waitForMembership(roomId, v.userId, "join", 30000);
    if (bot) for (const u of members) await u.waitForMembership(roomId, stack.botUserId, "join", 30000);
    return roomId;
};
for (const [p, pair] of pairs.entries()) {
    [pair.roomA, pair.roomB] = await Promise.all([room(pair.sideA, `soak A${p}`, true), room(pair.sideB, `soak B${p}`, true)]);
    await linkWithPower(stack, pair.sideA[0], pair.roomA, pair.sideB[0], pair.roomB);
}
const soakRooms = pairs.flatMap((p) => [p.roomA, p.roomB]);
const isGhost = (u) => u.startsWith("@_ferry_");
const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 19)}]`, ...a);
log(`${HS_LABEL}; ${nPairs} linked pair(s), ${nSenders} senders per room; ferry pid ${stack.ferry.pid}, homeserver pid ${hsPid}, postmaster ${postmasterPid}`);

// ---- the direct probe: what the homeserver sustains without ferry --------------------------------------------------
let probe = null;
if (probeS > 0) {
    const probeRooms = await Promise.all(pairs.flatMap((p, i) => [room(p.sideA, `probe A${i}`, false), room(p.sideB, `probe B${i}`, false)]));
    const hsCpu0 = cpuSeconds(hsPid);
    const node0 = process.cpuUsage();
    const t0 = performance.now();
    const end = t0 + probeS * 1000;
    let sent = 0;
    const lat = [];
    await Promise.all(
        pairs.flatMap((p, i) => [...p.sideA.map((u) => [u, probeRooms[2 * i]]), ...p.sideB.map((u) => [u, probeRooms[2 * i + 1]])]).map(async ([u, r]) => {
            for (let i = 0; performance.now() < end; i++) {
                const s = performance.now();
                await u.sendText(r, `probe ${i}`);
                lat.push(performance.now() - s);
                sent++;
            }
        }),
    );
    const wall = (performance.now() - t0) / 1000;
    const nodeCpu = process.cpuUsage(node0);
    probe = {
        seconds: round(wall, 1),
        rate: round(sent / wall, 1),
        sendMedianMs: round(quantile(lat, 0.5), 1),
        sendP90Ms: round(quantile(lat, 0.9), 1),
        hsCpuPct: round((100 * (cpuSeconds(hsPid) - hsCpu0)) / wall),
        nodeCpuPct: round((100 * (nodeCpu.user + nodeCpu.system)) / 1e6 / wall),
    };
    log(`direct probe: ${sent} messages in ${probe.seconds} s by ${users.length} senders, one at a time each: ${probe.rate} msg/s; ` +
        `send median ${probe.sendMedianMs} ms, p90 ${probe.sendP90Ms} ms; CPU homeserver ${probe.hsCpuPct}%, clients ${probe.nodeCpuPct}%`);
    for (const u of users) for (const r of probeRooms) if (u.client.getRoom(r)) await u.leave(r).catch(() => {});
    await sleep(3000);
}
if (minutes === 0) {
    await stopAll();
    process.exit(0);
}

// ---- counting copies ---------------------------------------------------------------------------------------------
// Messages are `soak <dir> <seq>`; sent[dir][seq] = time the homeserver accepted the original (ms, performance.now).
// Directions are named `<pair>ab` (room A → room B) and `<pair>ba`.
const dirs = {};
for (const [p, { sideA, sideB, roomA, roomB }] of pairs.entries()) {
    dirs[`${p}ab`] = { from: sideA, to: sideB, src: roomA, dst: roomB };
    dirs[`${p}ba`] = { from: sideB, to: sideA, src: roomB, dst: roomA };
}
const dirNames = Object.keys(dirs);
const sent = Object.fromEntries(dirNames.map((d) => [d, []]));
const seen = new Map(); // `${userId} ${dir}` -> Map(seq -> the first copy's event ID)
const dupIds = new Set(); // event IDs of second copies
const failed = new Map(); // eventId -> userId, copies still undecryptable
let win = { lat: [], received: 0, dups: 0 };
let totals = { received: 0, dups: 0 };
const latAll = [];

function watch(user, roomId, dir) {
    const consider = (ev) => {
        if (ev.getRoomId() !== roomId || !isGhost(ev.getSender() ?? "")) return;
        if (ev.isBeingDecrypted() || (ev.isEncrypted() && ev.shouldAttemptDecryption())) return; // Decrypted follows
        if (ev.isDecryptionFailure()) {
            failed.set(ev.getId(), user.userId);
            return;
        }
        failed.delete(ev.getId());
        const body = ev.getContent()?.body ?? "";
        const m = body.match(/^soak (\d+(?:ab|ba)) (\d+)$/);
        if (!m || m[1] !== dir) return;
        const seq = Number(m[2]);
        const key = `${user.userId} ${dir}`;
        let ids = seen.get(key);
        if (!ids) seen.set(key, (ids = new Map()));
        const firstId = ids.get(seq);
        if (firstId === ev.getId() || dupIds.has(ev.getId())) return;
        if (firstId !== undefined) {
            dupIds.add(ev.getId());
            win.dups++;
            totals.dups++;
            return;
        }
        ids.set(seq, ev.getId());
        win.received++;
        totals.received++;
        const t = sent[dir][seq];
        if (t !== undefined) {
            win.lat.push(performance.now() - t);
            latAll.push(performance.now() - t);
        }
    };
    user.client.on(RoomEvent.Timeline, (ev) => consider(ev));
    user.client.on(MatrixEventEvent.Decrypted, (ev) => consider(ev));
}
for (const [dir, d] of Object.entries(dirs)) for (const u of d.to) watch(u, d.dst, dir);

// Every member's live timeline grows by every event of its room; js-sdk keeps them all. Drop them now and then
// (timelineSupport is off, so a reset forgets the old events) so that the clients' memory measures nothing.
function trimTimelines() {
    for (const u of users) for (const r of soakRooms) {
        const rm = u.client.getRoom(r);
        if (rm && rm.getLiveTimeline().getEvents().length > 500) rm.resetLiveTimeline(null, null);
    }
}

// ---- warm-up: every sender's ghost exists and has shared its keys before the clock starts -------------------------
for (const [dir, d] of Object.entries(dirs)) {
    for (const u of d.from) {
        const seq = sent[dir].length;
        const arrived = d.to.map((r) => r.waitForEvent(d.dst, (e) => e.content.body === `soak ${dir} ${seq}`, 60000, `warm-up ${dir} ${seq}`));
        sent[dir].push(undefined);
        await u.sendText(d.src, `soak ${dir} ${seq}`);
        sent[dir][seq] = performance.now();
        await Promise.all(arrived);
    }
}
const warmupMessages = dirNames.reduce((n, d) => n + sent[d].length, 0);
win = { lat: [], received: 0, dups: 0 };
log(`warm-up done: ${warmupMessages} messages relayed; soaking for ${minutes} min at ${rate} msg/s (${rate / dirNames.length} in each of ${dirNames.length} directions)`);

// ---- the soak ---------------------------------------------------------------------------------------------------
const queued = new Map(users.map((u) => [u.userId, 0]));
const counts = { attempted: 0, accepted: 0, skipped: 0, sendErrors: 0 };
let winCounts = { accepted: 0, skipped: 0 };
const sendOne = (dir, u) => {
    counts.attempted++;
    if (queued.get(u.userId) >= maxQueue) {
        counts.skipped++;
        winCounts.skipped++;
        return;
    }
    const seq = sent[dir].length;
    sent[dir].push(undefined);
    queued.set(u.userId, queued.get(u.userId) + 1);
    u.sendText(dirs[dir].src, `soak ${dir} ${seq}`).then(
        () => {
            sent[dir][seq] = performance.now();
            counts.accepted++;
            winCounts.accepted++;
        },
        (e) => {
            counts.sendErrors++;
            sent[dir][seq] = null; // never accepted: not expected at the other side
            if (counts.sendErrors <= 5) log(`send failed: ${e.message}`);
        },
    ).finally(() => queued.set(u.userId, queued.get(u.userId) - 1));
};

const durationMs = minutes * 60000;
const start = performance.now();
let stopSending = false;
const pacer = (async () => {
    let n = 0;
    const turn = Object.fromEntries(dirNames.map((d) => [d, 0]));
    while (!stopSending) {
        const due = Math.floor(((performance.now() - start) / 1000) * rate);
        while (n < due && !stopSending) {
            const dir = dirNames[n % dirNames.length];
            const from = dirs[dir].from;
            sendOne(dir, from[turn[dir]++ % from.length]);
            n++;
        }
        if (performance.now() - start >= durationMs) stopSending = true;
        await sleep(5);
    }
})();

// Restarts half a sample interval after one third (SIGTERM, start) and two thirds (SIGKILL, start), between samples.
const events = [];
const restarts = [
    { at: durationMs / 3 + sampleS * 500, kill: false, label: "SIGTERM + start" },
    { at: (2 * durationMs) / 3 + sampleS * 500, kill: true, label: "SIGKILL + start" },
];
const restarter = (async () => {
    for (const r of restarts) {
        const wait = start + r.at - performance.now();
        if (wait > 0) await sleep(wait);
        if (stopSending) break;
        const t = performance.now();
        const old = stack.ferry.pid;
        await stack.restartFerry({ kill: r.kill });
        const down = round((performance.now() - t) / 1000, 1);
        events.push({ t: (t - start) / 1000, text: `${r.label} (${down} s down)` });
        log(`ferry restarted (${r.label}): pid ${old} → ${stack.ferry.pid}, ready after ${down} s`);
    }
})();

// Sampling.
const samples = [];
let prev = { t: start, metrics: await scrape(metricsUrl), ferryPid: stack.ferry.pid, ferryCpu: cpuSeconds(stack.ferry.pid), hsCpu: cpuSeconds(hsPid), node: process.cpuUsage(), pgCpu: pgCpuSeconds(), machine: machineCpu() };
const header =
    "| min | load1 | machine busy % | sent/s | skipped | recv/s | lat p50/p90 ms | ferry hist p50/p90 ms | ferry RSS MB | heap MB | goroutines | fds | sockets pg/hs/in | pg conns | inbox pend/keys | CPU% ferry/hs/pg/node | hs RSS MB | node RSS MB | event |";
console.log(`\n${header}\n|${"---|".repeat(header.split("|").length - 2)}`);
async function sample(final = false) {
    const now = performance.now();
    const wall = (now - prev.t) / 1000;
    const pid = stack.ferry.pid;
    const metrics = await scrape(metricsUrl);
    const { fds, sockets } = socketInodes(pid);
    const tcp = tcpTable();
    const sock = { pg: 0, hs: 0, in: 0, other: 0 };
    for (const i of sockets) {
        const s = tcp.get(i);
        if (!s) sock.other++;
        else if (s.remote === pgPort) sock.pg++;
        else if (s.remote === hsPort) sock.hs++;
        else if (s.local === ferryPort && s.state !== "0A") sock.in++;
        else sock.other++;
    }
    const ferryCpu = cpuSeconds(pid);
    const restarted = pid !== prev.ferryPid;
    const hsCpu = cpuSeconds(hsPid);
    const node = process.cpuUsage();
    const pgCpu = pgCpuSeconds();
    const machine = machineCpu();
    const pct = (a, b) => round((100 * (a - b)) / wall);
    const hist = buckets(metrics, "ferry_relay_latency_seconds");
    const prevHist = restarted ? null : buckets(prev.metrics, "ferry_relay_latency_seconds");
    const tMin = (now - start) / 60000;
    const evs = events.filter((e) => e.t * 1000 <= now - start && e.t * 1000 > prev.t - start).map((e) => e.text);
    const s = {
        minute: round(tMin, 1),
        load: readProc("/proc/loadavg").split(" ").slice(0, 3).map(Number),
        machineBusyPct: round((100 * (machine.busy - prev.machine.busy)) / (machine.total - prev.machine.total)),
        sentPerS: round(winCounts.accepted / wall, 1),
        skipped: winCounts.skipped,
        recvPerS: round(win.received / nSenders / wall, 1), // per receiving member
        dups: win.dups,
        latP50: round(quantile(win.lat, 0.5)),
        latP90: round(quantile(win.lat, 0.9)),
        ferryP50: round(histQuantile(prevHist, hist, 0.5) * 1000),
        ferryP90: round(histQuantile(prevHist, hist, 0.9) * 1000),
        ferryRssMB: round(rssMB(pid), 1),
        heapMB: round(msum(metrics, "go_memstats_heap_alloc_bytes") / 2 ** 20, 1),
        goroutines: msum(metrics, "go_goroutines"),
        fds,
        sockets: sock,
        pgConns: pgConnections(),
        inboxPending: msum(metrics, "ferry_inbox_events", { state: "pending" }),
        inboxWaitingKeys: msum(metrics, "ferry_inbox_events", { state: "waiting_keys" }),
        cpu: {
            ferry: pct(ferryCpu, restarted ? 0 : prev.ferryCpu), // after a restart: the new process only
            hs: pct(hsCpu, prev.hsCpu),
            pg: postmasterPid ? pct(pgCpu, prev.pgCpu) : null,
            node: round((100 * (node.user - prev.node.user + node.system - prev.node.system)) / 1e6 / wall),
        },
        hsRssMB: round(rssMB(hsPid), 1),
        nodeRssMB: round(process.memoryUsage().rss / 2 ** 20, 1),
        relayed: { sent: msum(metrics, "ferry_relayed_events_total", { outcome: "sent" }), retry: msum(metrics, "ferry_relayed_events_total", { outcome: "retry" }), failed: msum(metrics, "ferry_relayed_events_total", { outcome: "failed" }) },
        events: evs,
        ferryPid: pid,
    };
    samples.push(s);
    const c = s.cpu;
    console.log(
        `| ${s.minute}${final ? " (drain)" : ""} | ${s.load[0]} | ${s.machineBusyPct} | ${s.sentPerS} | ${s.skipped} | ${s.recvPerS} | ${s.latP50}/${s.latP90} | ${s.ferryP50}/${s.ferryP90} | ${s.ferryRssMB} | ${s.heapMB} | ${s.goroutines} | ${s.fds} | ${sock.pg}/${sock.hs}/${sock.in}${sock.other ? `+${sock.other}` : ""} | ${s.pgConns} | ${s.inboxPending}/${s.inboxWaitingKeys} | ${c.ferry ?? "–"}/${c.hs}/${c.pg ?? "–"}/${c.node} | ${s.hsRssMB} | ${s.nodeRssMB} | ${[...evs, s.dups ? `${s.dups} duplicates` : ""].filter(Boolean).join("; ")} |`,
    );
    prev = { t: now, metrics, ferryPid: pid, ferryCpu, hsCpu, node, pgCpu, machine };
    win = { lat: [], received: 0, dups: 0 };
    winCounts = { accepted: 0, skipped: 0 };
    trimTimelines();
}
for (let i = 1; i * sampleS <= minutes * 60 + 0.001; i++) {
    const next = start + i * sampleS * 1000;
    while (performance.now() < next) await sleep(Math.min(1000, next - performance.now()));
    await sample();
}
await pacer;
await restarter;

// ---- drain and count -----------------------------------------------------------------------------------------------
const expected = () => {
    let n = 0;
    for (const dir of dirNames) for (const t of sent[dir]) if (t !== null) n += nSenders;
    return n;
};
const drainStart = performance.now();
while (performance.now() - drainStart < drainS * 1000) {
    const inFlight = [...queued.values()].reduce((a, b) => a + b, 0);
    if (!inFlight && totals.received >= expected()) break;
    await sleep(1000);
}
const drainSeconds = round((performance.now() - drainStart) / 1000, 1);
await sample(true);

const missing = {};
const missingList = [];
for (const [dir, d] of Object.entries(dirs)) {
    for (const u of d.to) {
        const ids = seen.get(`${u.userId} ${dir}`) ?? new Map();
        let miss = 0;
        sent[dir].forEach((t, seq) => {
            if (t === null || ids.has(seq)) return;
            miss++;
            if (missingList.length < 20) missingList.push(`${dir} ${seq} at ${u.userId} (accepted ${round((performance.now() - t) / 1000)} s ago)`);
        });
        missing[u.userId] = miss;
    }
}
const soakSamples = samples.filter((s) => s.minute <= minutes + 0.01);
const first = soakSamples[0];
const last = samples.at(-1);
const summary = {
    homeserver: HS_LABEL,
    postgresFsync: process.env.FERRY_PG_FSYNC ?? "off",
    minutes,
    targetRate: rate,
    pairs: nPairs,
    sendersPerRoom: nSenders,
    probe,
    warmupMessages,
    attempted: counts.attempted,
    accepted: counts.accepted,
    skipped: counts.skipped,
    sendErrors: counts.sendErrors,
    achievedRate: round(counts.accepted / (durationMs / 1000), 1),
    copiesExpected: expected(),
    copiesReceived: totals.received,
    missingPerMember: missing,
    duplicates: totals.dups,
    undecryptable: failed.size,
    drainSeconds,
    latencyMs: { p50: round(quantile(latAll, 0.5)), p90: round(quantile(latAll, 0.9)), p99: round(quantile(latAll, 0.99)), max: round(Math.max(...latAll)) },
    restarts: events,
    firstSample: first,
    lastSample: last,
    relayed: last.relayed,
    machine: { cpus: os.cpus().length },
};
const maxMissing = Math.max(...Object.values(missing));
const maxDup = totals.dups;
console.log(`\n${HS_LABEL}, Postgres fsync=${summary.postgresFsync}, ${minutes} min at a target of ${rate} msg/s, ${nPairs} linked pair(s), ${nSenders} senders per room`);
console.log("| | |\n|---|---|");
const row = (k, v) => console.log(`| ${k} | ${v} |`);
if (probe) row("direct probe (no ferry)", `${probe.rate} msg/s, send p50 ${probe.sendMedianMs} ms, homeserver CPU ${probe.hsCpuPct}%, clients ${probe.nodeCpuPct}%`);
row("originals accepted", `${counts.accepted} of ${counts.attempted} due (${counts.skipped} skipped: sender queue full; ${counts.sendErrors} send errors) = ${summary.achievedRate} msg/s`);
row("copies decrypted", `${totals.received} of ${summary.copiesExpected} expected (every member of the other room), drain ${drainSeconds} s`);
row("missing (most at one member) / duplicates (all members)", `${maxMissing} / ${maxDup}`);
if (missingList.length) row("first missing copies", missingList.join("; "));
row("undecryptable at the end", failed.size);
row("latency accepted → decrypted", `p50 ${summary.latencyMs.p50} ms, p90 ${summary.latencyMs.p90} ms, p99 ${summary.latencyMs.p99} ms, max ${summary.latencyMs.max} ms`);
row("restarts", events.map((e) => `${e.text} at ${(e.t / 60).toFixed(1)} min`).join("; "));
const span = (k, f) => row(k, `${f(first)} → ${f(last)} (min ${Math.min(...samples.map(f))}, max ${Math.max(...samples.map(f))})`);
span("ferry RSS MB (first → last)", (s) => s.ferryRssMB);
span("ferry Go heap MB", (s) => s.heapMB);
span("goroutines", (s) => s.goroutines);
span("ferry fds", (s) => s.fds);
span("ferry sockets to Postgres", (s) => s.sockets.pg);
span("ferry sockets to the homeserver", (s) => s.sockets.hs);
span("Postgres connections", (s) => s.pgConns);
span("inbox pending", (s) => s.inboxPending);
span("homeserver RSS MB", (s) => s.hsRssMB);
span("clients (node) RSS MB", (s) => s.nodeRssMB);
row("ferry relayed (since last start)", JSON.stringify(last.relayed));
if (process.env.FERRY_SOAK_JSON) fs.writeFileSync(process.env.FERRY_SOAK_JSON, JSON.stringify({ summary, samples }, null, 1));
await stopAll();
process.exit(maxMissing || maxDup || failed.size ? 1 : 0);
