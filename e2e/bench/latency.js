// Relay-added latency with real clients on a real homeserver (FERRY_E2E_HS=dendrite|synapse). alice sends into
// room A, where carol also is. Room A is linked through ferry to room B, where bob is; in the same run room A2 is
// linked to room B2 by the floor appservice (floor.js: copies each event at once, no cryptography, no database),
// so the homeserver's own cost of a second hop is measured beside ferry's. Per message:
//   direct  send → carol's client has the event in room A (arrived / decrypted)
//   ferry   send → bob's client has ferry's copy in room B (arrived / decrypted)
//   floor   send → bob's client has the floor's copy in room B2 (arrived; it cannot be decrypted)
// Prints medians and p90s, ferry's distance from the floor and its ratio to a direct send.
//
//   FERRY_PG_FSYNC=on scripts/with-postgres.sh scripts/node22 e2e/bench/latency.js [messages] [gap-ms]
//
// By default each of ferry's messages is followed by one of the floor's. Synapse numbers the transactions of all
// its appservices from one sequence, so every transaction ferry gets then follows a gap, which ferry takes for a
// transaction that may be missing (bridge/txngaps.go): the worst case of an appservice sharing its homeserver
// with others. FERRY_BENCH_PHASES=1 measures all of ferry's messages first, then all of the floor's, so that
// ferry's transactions follow each other as on a homeserver where it is the only appservice.
// FERRY_FLOOR_EXTENSIONS=1 registers the floor with the transaction extensions ferry's registration asks for in
// appservice mode (floor.js): Synapse then computes for the floor's transactions what it computes for ferry's.
import { performance } from "node:perf_hooks";
import matrixSdk from "matrix-js-sdk";
import { HS_LABEL } from "../lib/homeserver.js";
import { histShare, msum, scrape } from "../lib/metrics.js";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { freePort, sleep } from "../lib/util.js";
import { prepareFloor } from "./floor.js";

const { RoomEvent } = matrixSdk;
const messages = Number(process.argv[2] ?? 60);
const gapMs = Number(process.argv[3] ?? 250);
const quantile = (xs, q) => {
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};
const fmt = (x) => `${x.toFixed(1)} ms`;

/** Resolves with performance.now() when an event from `sender` (a predicate on the user ID) reaches `user`'s
 * timeline of `roomId`, before any decryption. */
function arrival(user, roomId, sender) {
    return new Promise((resolve) => {
        const on = (ev) => {
            if (ev.getRoomId() === roomId && sender(ev.getSender())) {
                user.client.off(RoomEvent.Timeline, on);
                resolve(performance.now());
            }
        };
        user.client.on(RoomEvent.Timeline, on);
    });
}

const floorExtensions = process.env.FERRY_FLOOR_EXTENSIONS === "1";
const floor = await prepareFloor({ extensions: floorExtensions });
// ferry's metrics tell how long its part of each relay took (from the transaction that brought an event to the
// homeserver accepting its copy) and whether transactions waited for /sync.
const metricsUrl = `http://127.0.0.1:${await freePort()}/metrics`;
const stack = await startStack({
    extraConfig: { logging: { min_level: "info" }, metrics: { enabled: true, listen: new URL(metricsUrl).host } },
    extraRegistrations: [floor.registrationPath],
});
await floor.start(stack.hs.url);
const [alice, bob, carol] = await Promise.all(["alice", "bob", "carol"].map((n) => createUser(stack.hs.url, n)));
const isFerryGhost = (u) => u.startsWith("@_ferry_");
try {
    const roomA = await alice.createEncryptedRoom({ name: "latency A", invite: [carol.userId] });
    await carol.join(roomA);
    const roomB = await bob.createEncryptedRoom({ name: "latency B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkWithPower(stack, alice, roomA, bob, roomB);
    // The floor's pair: alice's room A2 copied into bob's room B2.
    const roomA2 = await alice.createEncryptedRoom({ name: "floor A2", invite: [bob.userId] });
    await bob.join(roomA2);
    const roomB2 = await bob.createEncryptedRoom({ name: "floor B2" });
    await floor.link(roomA2, roomB2, { invite: async (room, user) => (room === roomA2 ? alice : bob).invite(room, user) });
    await alice.waitForMembership(roomA, carol.userId, "join");
    await alice.waitForMembership(roomA2, floor.ghost, "join");
    // Warm up: ferry's ghost device, its session and the room keys exist before measuring.
    for (let i = 0; i < 3; i++) {
        const body = `warm-up ${i}`;
        const got = bob.waitForEvent(roomB, (e) => e.content.body === body, 30000, body);
        await alice.sendText(roomA, body);
        await got;
        const copied = arrival(bob, roomB2, (u) => u === floor.ghost);
        await alice.sendText(roomA2, body);
        await copied;
    }
    const r = { directArrived: [], directDecrypted: [], ferryArrived: [], ferryDecrypted: [], floorArrived: [] };
    const phases = process.env.FERRY_BENCH_PHASES === "1";
    // Each copy's second hop: its arrival less the original's at a member of the source room (carol in A for
    // ferry, bob in A2 for the floor), both of the same message, so that drift between the phases cancels out.
    const hops = { ferry: [], floor: [] };
    const floorMessage = async (body) => {
        const t0 = performance.now();
        const flArr = arrival(bob, roomB2, (u) => u === floor.ghost);
        const dArr = arrival(bob, roomA2, (u) => u === alice.userId);
        await alice.sendText(roomA2, body);
        const [copy, original] = await Promise.all([flArr, dArr]);
        r.floorArrived.push(copy - t0);
        hops.floor.push(copy - original);
    };
    if (phases) {
        // ferry's transactions must follow each other from here: one more message through ferry (the gap the
        // floor's warm-up left comes before it), then wait out the /sync reading that gap began.
        const got = bob.waitForEvent(roomB, (e) => e.content.body === "warm-up last", 30000, "warm-up last");
        await alice.sendText(roomA, "warm-up last");
        await got;
        await sleep(6000);
    }
    const before = await scrape(metricsUrl);
    for (let i = 0; i < messages; i++) {
        const body = `latency ${i}`;
        const t0 = performance.now();
        const dArr = arrival(carol, roomA, (u) => u === alice.userId);
        const fArr = arrival(bob, roomB, isFerryGhost);
        const dDec = carol.waitForEvent(roomA, (e) => e.type === "m.room.message" && e.content.body === body, 30000, body).then(() => performance.now());
        const fDec = bob.waitForEvent(roomB, (e) => e.type === "m.room.message" && e.content.body === body, 30000, body).then(() => performance.now());
        await alice.sendText(roomA, body);
        const [a, b, c, d] = await Promise.all([dArr, dDec, fArr, fDec]);
        r.directArrived.push(a - t0);
        r.directDecrypted.push(b - t0);
        r.ferryArrived.push(c - t0);
        r.ferryDecrypted.push(d - t0);
        hops.ferry.push(c - a);
        await sleep(gapMs / 2);
        if (!phases) await floorMessage(body);
        await sleep(gapMs / 2);
    }
    const after = await scrape(metricsUrl);
    for (let i = 0; phases && i < messages; i++) {
        await floorMessage(`latency ${i}`);
        await sleep(gapMs);
    }
    const row = (name, xs) => `| ${name} | ${fmt(quantile(xs, 0.5))} | ${fmt(quantile(xs, 0.9))} |`;
    console.log(`\n${HS_LABEL}, ${messages} messages, ${gapMs} ms apart (from alice's send), ${phases ? "ferry's then the floor's" : "ferry's and the floor's alternating"}${floorExtensions ? ", the floor registered with ferry's transaction extensions" : ""}\n`);
    console.log("| path | median | p90 |\n|---|---|---|");
    console.log(row("direct: arrived at carol (same room)", r.directArrived));
    console.log(row("direct: decrypted by carol", r.directDecrypted));
    console.log(row("floor appservice: arrived at bob (linked room)", r.floorArrived));
    console.log(row("ferry: arrived at bob (linked room)", r.ferryArrived));
    console.log(row("ferry: decrypted by bob", r.ferryDecrypted));
    const med = (xs) => quantile(xs, 0.5);
    console.log(`\nferry above the floor (arrival, medians): ${fmt(med(r.ferryArrived) - med(r.floorArrived))}`);
    console.log(`floor's second hop (floor arrival - direct arrival, medians): ${fmt(med(r.floorArrived) - med(r.directArrived))}`);
    console.log(`second hops, per message (copy arrival - the original's arrival in its room), medians: ferry ${fmt(med(hops.ferry))}, floor ${fmt(med(hops.floor))}; ferry above the floor: ${fmt(med(hops.ferry) - med(hops.floor))}`);
    console.log(`ratio to a direct send (decrypted, medians): ${(med(r.ferryDecrypted) / med(r.directDecrypted)).toFixed(2)}x`);
    // ferry's own part, from its metrics over its measured messages (histogram buckets: shares, not quantiles).
    const share = (name, les, labels) =>
        les.map((le) => {
            const [s] = histShare(before, after, name, le, labels);
            return `≤ ${le * 1000} ms ${(s * 100).toFixed(0)}%`;
        });
    const [, relayed] = histShare(before, after, "ferry_relay_processing_seconds", 1);
    console.log(`ferry's own part (its transaction in → the copy, encrypted, sent to the homeserver), ${relayed} copies: ${share("ferry_relay_processing_seconds", [0.001, 0.0025, 0.005, 0.01]).join(", ")}`);
    const [, commits] = histShare(before, after, "ferry_database_commit_seconds", 1, { operation: "intake" });
    console.log(`intake commits (before a transaction is answered), ${commits}: ${share("ferry_database_commit_seconds", [0.001, 0.0025, 0.005], { operation: "intake" }).join(", ")}`);
    const held = ["start", "gap", "redelivery", "unnumbered", "uncovered"]
        .map((reason) => [reason, msum(after, "ferry_held_transactions_total", { reason }) - msum(before, "ferry_held_transactions_total", { reason })])
        .filter(([, n]) => n > 0);
    console.log(`transactions that waited for /sync: ${held.length ? held.map(([r, n]) => `${n} (${r})`).join(", ") : "none"}`);
} finally {
    await Promise.all([alice.stop(), bob.stop(), carol.stop()]);
    await stack.stop();
    await floor.stop();
}
