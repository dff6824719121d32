// Relay-added latency with real clients on a real homeserver (FERRY_E2E_HS=dendrite|synapse): alice sends into
// room A, where carol also is; room A is linked to room B, where bob is. For each message: send → decrypted by
// carol (a member of the same room: the homeserver's own delivery) against send → decrypted by bob (a member of
// the linked room: ferry's relay on top). Prints medians and p90s, and the ratio.
//
//   FERRY_PG_FSYNC=on scripts/with-postgres.sh scripts/node22 e2e/bench/latency.js [messages] [gap-ms]
import { performance } from "node:perf_hooks";
import { HS_LABEL } from "../lib/homeserver.js";
import { inviteBot, linkWithPower, startStack } from "../lib/stack.js";
import { createUser } from "../lib/users.js";
import { sleep } from "../lib/util.js";

const messages = Number(process.argv[2] ?? 60);
const gapMs = Number(process.argv[3] ?? 250);
const quantile = (xs, q) => {
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};
const fmt = (x) => `${x.toFixed(1)} ms`;

const stack = await startStack({ extraConfig: { logging: { min_level: "info" } } });
const [alice, bob, carol] = await Promise.all(["alice", "bob", "carol"].map((n) => createUser(stack.hs.url, n)));
try {
    const roomA = await alice.createEncryptedRoom({ name: "latency A", invite: [carol.userId] });
    await carol.join(roomA);
    const roomB = await bob.createEncryptedRoom({ name: "latency B" });
    await inviteBot(stack, alice, roomA);
    await inviteBot(stack, bob, roomB);
    await linkWithPower(stack, alice, roomA, bob, roomB);
    await alice.waitForMembership(roomA, carol.userId, "join");
    // Warm up: the ghost's device, its session and the room keys exist before measuring.
    for (let i = 0; i < 3; i++) {
        const body = `warm-up ${i}`;
        const got = bob.waitForEvent(roomB, (e) => e.content.body === body, 30000, body);
        await alice.sendText(roomA, body);
        await got;
    }
    const direct = [];
    const relayed = [];
    for (let i = 0; i < messages; i++) {
        const body = `latency ${i}`;
        const t0 = performance.now();
        const inA = carol.waitForEvent(roomA, (e) => e.type === "m.room.message" && e.content.body === body, 30000, body).then(() => performance.now() - t0);
        const inB = bob.waitForEvent(roomB, (e) => e.type === "m.room.message" && e.content.body === body, 30000, body).then(() => performance.now() - t0);
        await alice.sendText(roomA, body);
        const [a, b] = await Promise.all([inA, inB]);
        direct.push(a);
        relayed.push(b);
        await sleep(gapMs);
    }
    const row = (name, xs) => `| ${name} | ${fmt(quantile(xs, 0.5))} | ${fmt(quantile(xs, 0.9))} |`;
    console.log(`\n${HS_LABEL}, ${messages} messages, ${gapMs} ms apart (send → decrypted by the receiving client)\n`);
    console.log("| path | median | p90 |\n|---|---|---|");
    console.log(row("same room (carol)", direct));
    console.log(row("linked room through ferry (bob)", relayed));
    console.log(`\nratio of medians: ${(quantile(relayed, 0.5) / quantile(direct, 0.5)).toFixed(2)}x; relay adds ${fmt(quantile(relayed, 0.5) - quantile(direct, 0.5))} (median)`);
} finally {
    await Promise.all([alice.stop(), bob.stop(), carol.stop()]);
    await stack.stop();
}
