// How many events a second the homeserver itself persists on this machine, with nothing else in the way: no
// ferry, no syncing clients, no encryption work. Pairs of users (registered through the shared-secret admin API,
// without a device's keys or a /sync) share encrypted rooms and send m.room.encrypted events with a fixed body as
// fast as the server answers, each user FERRY_CEILING_INFLIGHT sends at a time, for the given seconds. A relayed
// message costs a homeserver at least two such events (the original and ferry's copy), so half the rate printed
// here bounds what any relay can carry through this server here (issue 13's soak, docs/BENCHMARKS.md "Soak").
//
//   FERRY_E2E_HS=dendrite|synapse scripts/node22 e2e/bench/hsceiling.js [seconds]
//
// Env: FERRY_CEILING_USERS (default 32, an even number: two per room), FERRY_CEILING_INFLIGHT (default 2),
// FERRY_E2E_SYNAPSE_DB=postgres or FERRY_E2E_DENDRITE_DB=postgres (the homeserver on a database of the Postgres
// from with-postgres.sh), TMPDIR (where the homeserver keeps its files; /dev/shm takes the disk's flushes out).
import fs from "node:fs";
import { performance } from "node:perf_hooks";
import { HS_LABEL, startHomeserver } from "../lib/homeserver.js";
import { registerWithSharedSecret } from "../lib/users.js";

const seconds = Number(process.argv[2] ?? 20);
const nUsers = Number(process.env.FERRY_CEILING_USERS ?? 32);
const inflight = Number(process.env.FERRY_CEILING_INFLIGHT ?? 2);
if (!(nUsers >= 2 && nUsers % 2 === 0) || !(inflight >= 1) || !(seconds > 0)) {
    throw new Error("hsceiling: FERRY_CEILING_USERS must be an even number ≥ 2, FERRY_CEILING_INFLIGHT ≥ 1, seconds > 0");
}
const secret = `ceiling-${Math.random().toString(36).slice(2)}`;
const hs = await startHomeserver({ sharedSecret: secret });

async function call(user, method, path, body) {
    const res = await fetch(hs.url + path, {
        method,
        headers: { authorization: `Bearer ${user.accessToken}`, "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`${method} ${path} -> ${res.status}: ${JSON.stringify(json)}`);
    return json;
}
/** The machine's busy and total CPU ticks so far (/proc/stat). */
function machineTicks() {
    const f = fs.readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1, 9).map(Number);
    const total = f.reduce((a, b) => a + b, 0);
    return { busy: total - f[3] - f[4], total };
}

try {
    const users = [];
    for (let i = 0; i < nUsers; i++) {
        users.push(await registerWithSharedSecret(hs.url, secret, `ceiling${i}`, `password-${i}-${secret}`));
    }
    const roomOf = [];
    for (let i = 0; i < nUsers; i += 2) {
        const { room_id: room } = await call(users[i], "POST", "/_matrix/client/v3/createRoom", {
            preset: "public_chat",
            initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
        });
        await call(users[i + 1], "POST", `/_matrix/client/v3/join/${encodeURIComponent(room)}`, {});
        roomOf[i] = roomOf[i + 1] = room;
    }
    // The size of a short message's ciphertext; the server does not look inside.
    const content = { algorithm: "m.megolm.v1.aes-sha2", ciphertext: "A".repeat(300), device_id: "CEILING", sender_key: "k", session_id: "s" };
    const waits = [];
    let txn = 0;
    const t0 = performance.now();
    const end = t0 + seconds * 1000;
    const ticks0 = machineTicks();
    const cpu0 = process.cpuUsage();
    await Promise.all(
        users.flatMap((user, i) =>
            Array.from({ length: inflight }, async () => {
                while (performance.now() < end) {
                    const start = performance.now();
                    await call(user, "PUT", `/_matrix/client/v3/rooms/${encodeURIComponent(roomOf[i])}/send/m.room.encrypted/c${txn++}`, content);
                    waits.push(performance.now() - start);
                }
            }),
        ),
    );
    const elapsed = (performance.now() - t0) / 1000;
    const ticks1 = machineTicks();
    const cpu = process.cpuUsage(cpu0);
    waits.sort((a, b) => a - b);
    const q = (p) => waits[Math.min(waits.length - 1, Math.floor(p * waits.length))].toFixed(0);
    console.log(
        `${HS_LABEL}: ${(waits.length / elapsed).toFixed(1)} events/s persisted over ${elapsed.toFixed(1)} s ` +
            `(${nUsers} users in ${nUsers / 2} rooms, ${inflight} sends in flight each; send median ${q(0.5)} ms, p90 ${q(0.9)} ms); ` +
            `machine ${((100 * (ticks1.busy - ticks0.busy)) / (ticks1.total - ticks0.total)).toFixed(0)}% busy, ` +
            `this process ${(((cpu.user + cpu.system) / 1e6 / elapsed) * 100).toFixed(0)}% of a core`,
    );
} finally {
    await hs.stop();
}
